"""Model card generation: ``card.py`` renders ``model_card.md`` from a run's metadata."""
