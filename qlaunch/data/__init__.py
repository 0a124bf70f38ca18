"""Training data: files → canonical messages → token ids and labels → batches.

Owns the input formats (formats), chat templates and where the trained text lies (templates),
label masks and the length policy (labels), batched tokenization (tokenize), the Arrow cache of
tokenized data (cache), the datasets (dataset), packing (packing) and the collator (collate).
May import qlaunch.config only.
"""
