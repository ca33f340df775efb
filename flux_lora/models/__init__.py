"""Models: loading through from_pretrained, the cache fingerprint, FLUX.1's encoders, tiny and synthetic models."""
