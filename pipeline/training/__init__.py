"""SAE training: the objectives (`sae`) and the loop that saves a trained SAE (`train`)."""
