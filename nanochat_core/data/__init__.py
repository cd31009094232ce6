"""Text in, token batches out - and the small corpus that ships with the package.

    tokenizer.py           byte-level BPE (trained with `tokenizers`, encoded with `tiktoken`) and chat rendering
    dataset.py             parquet shard sources, the downloader, the bundled corpus (the last shard is validation)
    dataloader.py          BOS-aligned best-fit packing into (B, T) batches, resumable
    user_data.py           your own documents, conversations and identity: read, checked, packed into a bundle
    build_bundled.py       how bundled/ was made; build_chat_local.py how chat_local.jsonl was made
    bundled/ chat_local.jsonl identity.jsonl sources.json   the data files themselves
"""
