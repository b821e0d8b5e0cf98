"""The synthetic ground-truth lab: generators of activations with known true features, the dataset
file they are saved in, and how well an SAE recovers them."""
