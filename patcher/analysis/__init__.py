"""What the edits are chosen from: key statistics, attributions, causal effects."""
