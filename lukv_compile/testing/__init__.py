"""Property suites for a user's CI: prove a model stays exact, compressed and compiled once under lukv.

    from lukv_compile.testing import Subject, check_property, PROPERTIES
    subject = Subject(model, profile=lukv_compile.Profile.load("my-profile.safetensors"))
    for name in PROPERTIES:
        check_property(name, subject)                 # PropertyFailed names the property and the inputs

The same suite runs as `pytest --lukv-model MODEL [--lukv-profile FILE]` (the pytest plugin this package
installs) and as `lukv check MODEL`. `strategies` has the hypothesis strategies, `generation` and
`simulation` the comparisons the properties are built from (the project's own tests use them too).
"""

from lukv_compile.testing.generation import (
    assert_same_conversation,
    assert_same_generation,
    conversation,
    generate_logits,
    left_padded_batch,
)
from lukv_compile.testing.loading import load_model_spec, load_subject
from lukv_compile.testing.properties import PROPERTIES, PropertyFailed, Subject, check_property
from lukv_compile.testing.simulation import masked_reference

__all__ = ["PROPERTIES", "PropertyFailed", "Subject", "assert_same_conversation", "assert_same_generation",
           "check_property", "conversation", "generate_logits", "left_padded_batch", "load_model_spec",
           "load_subject", "masked_reference"]
