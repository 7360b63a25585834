"""What the bytes are: checkpoint source kinds (SavedModels, object graphs, readable names)."""
