"""Building blocks of the models: linear (merged QKV / gate-up with weight_loader hooks), embedding, rotary,
norm, activation."""
