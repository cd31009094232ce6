"""Using a trained model.

    engine.py      KV-cache generation with sampling and the calculator tool
    calculator.py  the tool itself: safe arithmetic and string counting
    chat.py        terminal chat (`nanochat chat`)
    serve.py       web chat + OpenAI-compatible API (`nanochat serve`); static/ is the page
    serve_net.py   the server's edge towards the network: binds, keys, Host checks, limits
    api_models.py  the request body of /v1/chat/completions as pydantic models
    export.py      the model as a Hugging Face folder; hf/ holds the modeling code that folder ships
"""
