"""The transformer, tokenizer, quantized/fused linears, layer ranges."""
