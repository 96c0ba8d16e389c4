"""The checkpoint variants the tests run every reader, bundle and reference over: one table
(``ExampleOptions`` overrides by name), shared by every test that iterates over variants."""

VARIANTS: dict[str, dict] = {
    "default": {},
    "no-layer-norm-relu": {"layer_norm": False, "activation": "relu"},
    "tanh": {"activation": "tanh"},
    "silu-tied": {"activation": "silu", "tied": True},
    "sharded": {"shards": 3},
    "pickle": {"weights_format": "pickle"},
    "pickle-sharded": {"weights_format": "pickle", "shards": 2},
    "padded-vocab": {"resize_vocab": False},
    "base-dir": {"embed_text_config": False},
    "training-state": {"training_state": True},
    "float32": {"dtype": "float32"},
}
