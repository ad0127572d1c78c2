"""Vector indexes: faiss build / save / load / search, used by mining, evaluation and serving."""
