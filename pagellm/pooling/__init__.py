"""Pooling models: one vector per prompt (embeddings, scores) instead of generated text.

    st_config.py   what the model folder says about pooling (sentence-transformers' modules.json and
                   1_Pooling/config.json; Matryoshka dimensions); whether a model is a pooling model at all
    pooler.py      hidden states of a flat batch -> one vector per request (mean, CLS, last token), normalized
    bert.py        BertModel in plain PyTorch: bidirectional attention over each whole prompt, no KV cache
    decoder.py     a pagellm decoder (Llama, Qwen2, Qwen3) as an embedder: one prefill over a throw-away cache
    engine.py      PoolingEngine: requests -> batches under the scheduler's token budget -> vectors
    outputs.py     vLLM's output shapes (EmbeddingRequestOutput, PoolingRequestOutput, ScoringRequestOutput)
    async_engine.py  the server's asyncio front: concurrent requests share the engine's steps
"""
