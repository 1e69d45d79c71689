"""Hot kernels for dora (installed as `dora_kernels`).

Each kernel ships with a pure-torch reference, a fast path chosen automatically and a parity test.
The torch references currently live next to their callers (e.g. chunked log-probs in
`dora.trainer`); Triton versions land here as they are written.
"""
