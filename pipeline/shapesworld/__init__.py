"""ShapesWorld, the toy text-to-image world oneword measures quality in: the world (shapes, colours,
captions), its oracle and scoring, and (a development tool, not needed at run time) the trainer
of its bundled model and oracle."""
