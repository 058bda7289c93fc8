"""Shared fixtures: one tiny model and one set of concept images per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from pipeline.config import InversionConfig
from pipeline.data import load_images
from pipeline.model import TINY_TEXT_CONFIG, BaseModel, build_tiny_model, load_base_model
from pipeline.shapesworld import write_concept_images


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def vpred_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vpred"), seed=1, prediction_type="v_prediction")


@pytest.fixture
def model(tiny_model_dir) -> BaseModel:
    """A fresh load per test: tests may check that weights are untouched."""
    return load_base_model(tiny_model_dir, "cpu")


@pytest.fixture(scope="session")
def star_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("star")
    write_concept_images(out, "star", "yellow", count=5, size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def star_images(star_dir) -> torch.Tensor:
    return load_images(star_dir, 64)


DIM = TINY_TEXT_CONFIG["hidden_size"]  # the tiny model's embedding width


def small_config(**overrides) -> InversionConfig:
    values = dict(steps=20, batch_size=2, learning_rate=5e-3, init_word="shape", seed=3, checkpoint_interval=5)
    values.update(overrides)
    return InversionConfig(**values)
