"""One module per PEFT family; each exposes ``METHOD`` (see ``theory.registry``)."""
