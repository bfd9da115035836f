"""Side-memory editors: methods that leave the model's weights as they are and add to them at
inference."""
