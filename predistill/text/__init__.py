"""Text in and between tokenizers: sources, the packaged text, chunking, re-tokenisation, cross-tokenizer alignment."""
