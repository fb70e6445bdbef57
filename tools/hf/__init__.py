"""Hugging Face interop: the source bundler, the modeling-code templates, tokenizer conversion.

`templates/` holds files that are copied into an export folder; they import the bundled copies of
based_layers (relative imports inside the export), so they are never imported from this repository.
"""
