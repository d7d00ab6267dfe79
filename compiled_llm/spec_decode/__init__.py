"""Speculative decoding: proposers guess a decoding request's next tokens and the target model
verifies them in its ordinary step (docs/speculative_decoding.md). Proposers are registered by
`method` name (`proposer.py`); `decoder.py` is what the engine core talks to."""
