// Tokenizer throughput (issue 4: >= 1M tokens/s on one core for English text).
//
//   tokenizer_bench [--tokenizer DIR] [--file TEXT_FILE] [--mb N] [--seconds S]
//
// Encodes English text on one thread, line by line (as the data pipeline
// does), and prints one JSON line: tokens, bytes, seconds, tokens_per_s,
// mb_per_s. Without --file the text is synthetic English (sentences from a
// fixed word list with punctuation, numbers and capitals, deterministic seed).
// The first pass warms the word cache like a real dataset does; the figure is
// from the passes that follow until --seconds have passed.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "worker/trainer/data/tokenizer.h"

namespace {

std::vector<std::string> SyntheticEnglish(size_t bytes) {
  static const char* kWords[] = {
      "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as",
      "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but",
      "not", "what", "all", "were", "we", "when", "your", "can", "said", "there", "use", "an", "each",
      "which", "she", "do", "how", "their", "if", "will", "up", "other", "about", "out", "many", "then",
      "them", "these", "so", "some", "her", "would", "make", "like", "him", "into", "time", "has", "look",
      "two", "more", "write", "go", "see", "number", "no", "way", "could", "people", "my", "than",
      "first", "water", "been", "called", "who", "oil", "its", "now", "find", "long", "down", "day",
      "did", "get", "come", "made", "may", "part", "model", "training", "learning", "language", "data",
      "network", "function", "important", "different", "following", "government", "information",
      "development", "understanding", "experience", "community", "political", "available", "research",
      "especially", "international", "performance", "environment", "significant", "management"};
  const size_t n = sizeof(kWords) / sizeof(kWords[0]);
  std::mt19937 rng(12345);
  std::vector<std::string> lines;
  size_t total = 0;
  while (total < bytes) {
    std::string line;
    int sentences = 1 + rng() % 5;
    for (int s = 0; s < sentences; ++s) {
      int len = 5 + rng() % 18;
      for (int w = 0; w < len; ++w) {
        std::string word = kWords[rng() % n];
        if (w == 0) word[0] = static_cast<char>(std::toupper(word[0]));
        if (rng() % 40 == 0) word = std::to_string(rng() % 10000);
        line += word;
        if (w + 1 < len) line += (rng() % 12 == 0) ? ", " : " ";
      }
      line += (rng() % 10 == 0) ? "? " : ". ";
    }
    total += line.size();
    lines.push_back(std::move(line));
  }
  return lines;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = std::string(TUNE_BENCH_ASSETS_DIR) + "/llama3";
  std::string file;
  double mb = 8, seconds = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--tokenizer") dir = argv[i + 1];
    else if (a == "--file") file = argv[i + 1];
    else if (a == "--mb") mb = std::stod(argv[i + 1]);
    else if (a == "--seconds") seconds = std::stod(argv[i + 1]);
    else {
      std::cerr << "usage: tokenizer_bench [--tokenizer DIR] [--file F] [--mb N] [--seconds S]\n";
      return 2;
    }
  }
  std::vector<std::string> lines;
  if (!file.empty()) {
    std::ifstream in(file);
    if (!in) {
      std::cerr << "cannot open " << file << "\n";
      return 1;
    }
    std::string l;
    while (std::getline(in, l)) lines.push_back(l);
  } else {
    lines = SyntheticEnglish(static_cast<size_t>(mb * 1e6));
  }
  auto t0 = std::chrono::steady_clock::now();
  auto tok = tune::data::Tokenizer::FromDir(dir);
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  size_t bytes_per_pass = 0;
  for (auto& l : lines) bytes_per_pass += l.size();
  // Warm-up pass (fills the word cache).
  size_t warm_tokens = 0;
  auto w0 = std::chrono::steady_clock::now();
  for (auto& l : lines) warm_tokens += tok->Encode(l, false).size();
  double warm_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
  size_t tokens = 0, bytes = 0;
  auto s0 = std::chrono::steady_clock::now();
  double el = 0;
  do {
    for (auto& l : lines) tokens += tok->Encode(l, false).size();
    bytes += bytes_per_pass;
    el = std::chrono::duration<double>(std::chrono::steady_clock::now() - s0).count();
  } while (el < seconds);
  std::printf(
      "{\"tokenizer\": \"%s\", \"load_s\": %.3f, \"first_pass_tokens_per_s\": %.0f, \"tokens\": %zu, "
      "\"bytes\": %zu, \"seconds\": %.3f, \"tokens_per_s\": %.0f, \"mb_per_s\": %.2f}\n",
      dir.c_str(), load_s, warm_tokens / warm_s, tokens, bytes, el, tokens / el, bytes / el / 1e6);
  return 0;
}
