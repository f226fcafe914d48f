"""Hugging Face remote-code modeling files for flaxchat exports (torch + transformers only).

The two modules here are copied verbatim into an export directory and imported by transformers
(`trust_remote_code=True`); this package deliberately imports nothing, so importing flaxchat never
needs torch. See flaxchat/export/hf_config.py for the torch-free config.json writer.
"""
