"""The textual-inversion engine: config and recipes, model loading, images and captions, prompts with
concept vectors, the training step and its extra losses, the training loop, file formats and
generation. Knows nothing of Ray, object storage or HTTP; imports only ``pipeline.errors`` and
``pipeline.atomic_files`` from outside itself."""
