"""Everything that turns weights and a flat batch into logits: layers, models, loaders."""
