"""Text on its way in: sentence splitting for streamed LLM text, and packing into model-sized pieces."""
