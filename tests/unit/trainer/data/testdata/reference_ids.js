// Reference ids from Hugging Face's Rust tokenizers (npm `tokenizers`).
// usage: node reference_ids.js NODE_MODULES_DIR TOKENIZER_JSON CORPUS_JSONL ADD_SPECIAL(0|1)
// Prints one JSON array of ids per corpus line (each line is a JSON string).
const path = require('path');
const fs = require('fs');
const [modules, tokFile, corpus, addSpecial] = process.argv.slice(2);
const { Tokenizer } = require(path.join(modules, 'tokenizers'));
const tok = Tokenizer.fromFile(tokFile);
const lines = fs.readFileSync(corpus, 'utf8').split('\n').filter((l) => l.length > 0);
(async () => {
  const texts = lines.map((l) => JSON.parse(l));
  const encs = await tok.encodeBatch(texts, { addSpecialTokens: addSpecial === '1' });
  process.stdout.write(encs.map((e) => JSON.stringify(e.getIds())).join('\n') + '\n');
})().catch((e) => { console.error(e); process.exit(1); });
