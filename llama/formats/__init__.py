"""Every file layout read or written, split folders, convert, LoRA merge, download."""
