#!/usr/bin/env python3
"""Generates tokenizer_corpus.jsonl: one JSON string per line (so texts may
hold newlines, CR, NEL...). Deterministic (fixed seed). Regenerate with
  python3 make_corpus.py > tokenizer_corpus.jsonl
The tokenizer equality test feeds every line to Hugging Face's `tokenizers`
(Node binding) and to tune::data::Tokenizer and compares ids."""
import json
import random

rng = random.Random(20240729)

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "It's a beautiful day, isn't it? I'd say we'll go out; they've said you're right.",
    "HE'S HERE. SHE'LL COME. WE'VE SEEN. I'M FINE. THEY'D LEFT. DON'T!",
    "Fine-tuning large language models requires careful data preparation.",
    "Dr. Smith's lab (est. 1999) published 42 papers in Nature & Science.",
    "\"Quoted text,\" she said -- and then: 'single quotes' too...",
    "E-mail me at john.doe+test@example.com or visit https://example.org/path?q=1&x=y#frag.",
    "Mixed CASE Words LikeThis and camelCaseIdentifiers plus snake_case_names.",
    "Once upon a time, in a land far, far away, there lived a king.",
    "Numbers: 3.14159, 2,718,281, -42, +7, 1e-9, 0x1F, 100%, $19.99, 12:30pm.",
]
WORDS = ("the of and to in is you that it he was for on are as with his they I at be this have from "
         "or one had by word but not what all were we when your can said there use an each which she do "
         "how their if will up other about out many then them these so some her would make like him into "
         "time has look two more write go see number no way could people my than first water been call "
         "who oil its now find long down day did get come made may part tokenizer gradient adapter").split()
CODE = [
    "def foo(x: int) -> int:\n    return x ** 2 + 1\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "    if (err != nil) {\n\t\treturn fmt.Errorf(\"failed: %w\", err)\n\t}\n",
    "#include <vector>\nstd::vector<int32_t> ids{1, 2, 3};",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name DESC;",
    "const f = async (a, b) => { await g(a?.b ?? 0); };",
    "<div class=\"x\"><span>Hello</span></div>",
    "x=[i for i in range(10) if i%2==0]  # comment",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "{\"key\": [1, 2.5, true, null], \"nested\": {\"a\": \"b\"}}",
    "git commit -m 'fix: handle CRLF' && make -j8 || echo failed",
    "a<<=2; b>>=3; c!==d; e=>f; g::h; i->j; k...l; m//n",
]
UNICODE_SPACES = ["\u00a0", "\u1680", "\u2000", "\u2001", "\u2002", "\u2003", "\u2004", "\u2005",
                  "\u2006", "\u2007", "\u2008", "\u2009", "\u200a", "\u2028", "\u2029", "\u202f",
                  "\u205f", "\u3000", "\u0085", "\ufeff", "\u200b", "\u180e", "\u000b", "\u000c",
                  "\u001c", "\u001d", "\u001e", "\u001f"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇯🇵", "🤖", "🧑🏿‍💻", "✊🏻", "👩‍❤️‍💋‍👨", "1️⃣", "🫠"]
CJK = ["你好，世界！", "日本語のテキストです。", "한국어 문장입니다.", "机器学习模型训练", "漢字とひらがなとカタカナ",
       "中文标点：“引号”、《书名》", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ１２３"]
ARABIC = ["مرحبا بالعالم", "اللغة العربية جميلة ١٢٣", "שלום עולם", "Привет, мир!", "Γειά σου Κόσμε",
          "नमस्ते दुनिया", "สวัสดีชาวโลก", "Xin chào thế giới"]
COMBINING = ["e\u0301", "a\u0300\u0316", "n\u0303o", "Z\u0351\u0352\u0353a\u0354l\u0355g\u0356o",
             "\u0915\u094d\u0937", "cafe\u0301 re\u0301sume\u0301", "\u1100\u1161\u11a8", "o\u0308\u0304"]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|reserved_special_token_5|>", "<|finetune_right_pad_id|>",
            "<|python_tag|>", "<|eom_id|>"]
NEAR_MISSES = ["<|begin_of_text|", "<|begin_of_text>", "<begin_of_text|>", "<|BEGIN_OF_TEXT|>",
               "< |eot_id|>", "<|eot_id |>", "<|eot_id||>", "<<|eot_id|>>", "<|eot_i|>", "|eot_id|",
               "<|start_header_id|<|end_header_id|>", "<|reserved_special_token_999|>", "<||>", "<|",
               "|>", "<|eot_id|><|eot_id|>"]
WS = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n", " \n", "\n ", "\t\t", "    ", "\r\n\r\n", " \t \n"]
APOS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'LL", "'D", "’s", "'x", "''"]


def words(n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def number():
    k = rng.randrange(6)
    if k == 0: return str(rng.randrange(10 ** rng.randrange(1, 12)))
    if k == 1: return f"{rng.random() * 1000:.{rng.randrange(1, 6)}f}"
    if k == 2: return "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 20)))
    if k == 3: return f"{rng.randrange(1, 31)}/{rng.randrange(1, 13)}/{rng.randrange(1900, 2100)}"
    if k == 4: return rng.choice(["١٢٣٤", "٣.١٤", "²³", "½", "Ⅻ", "①②", "𝟙𝟚𝟛", "߀߁"])
    return f"{rng.randrange(-99999, 99999):,}"


def fragment():
    k = rng.randrange(14)
    if k == 0: return rng.choice(ENGLISH)
    if k == 1: return words(rng.randrange(1, 15))
    if k == 2: return rng.choice(CODE)
    if k == 3: return number()
    if k == 4: return rng.choice(WS) * rng.randrange(1, 4)
    if k == 5: return rng.choice(UNICODE_SPACES) * rng.randrange(1, 3)
    if k == 6: return rng.choice(EMOJI)
    if k == 7: return rng.choice(CJK)
    if k == 8: return rng.choice(ARABIC)
    if k == 9: return rng.choice(COMBINING)
    if k == 10: return rng.choice(SPECIALS)
    if k == 11: return rng.choice(NEAR_MISSES)
    if k == 12: return rng.choice(WORDS) + rng.choice(APOS)
    return "".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0xa0, 0x2000),
                                   rng.randrange(0x2000, 0x3100), rng.randrange(0x1f300, 0x1fa00)]))
                   for _ in range(rng.randrange(1, 8)))


lines = []
# Fixed, hand-picked lines first (the golden subset uses the first ones).
lines += ENGLISH + CODE + CJK + ARABIC + COMBINING + EMOJI
lines += [s + " tail" for s in SPECIALS] + ["head " + s for s in NEAR_MISSES]
lines += ["a" + sp + "b" for sp in UNICODE_SPACES]
lines += ["x" + w + "y" for w in WS] + [w for w in WS]
lines += [w + a + " ok" for w in ["it", "IT", "we", "   "] for a in APOS]
lines += ["", " ", "a", "\n", "\r\n\r\n  x", "  leading and trailing  ", "tab\tseparated\tvalues\t"]
lines += ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"]
lines += ["a" * 300, "ab" * 200, "9" * 50, " " * 40 + "x", "\n" * 7, "🙂" * 30]
while len(lines) < 2200:
    n = rng.randrange(1, 6)
    sep = rng.choice(["", " ", " ", "\n", "", "\t"])
    lines.append(sep.join(fragment() for _ in range(n)))
for s in lines:
    print(json.dumps(s, ensure_ascii=True))
