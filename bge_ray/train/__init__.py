"""Ray Train fine-tuning: FlagEmbedding's training data and losses on a Ray Train worker group."""
