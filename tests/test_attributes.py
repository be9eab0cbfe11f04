import pytest

from steerlm.attributes import PAPER, STEERABLE, AttributeSchema, bucket, canonical_order, parse_assignment
from steerlm.errors import UserError


def test_bucket_is_half_to_even_over_levels():
    # SPEC §1: level = round(value * (L - 1)) with Python's round
    assert bucket(0.0, 10) == 0 and bucket(1.0, 10) == 9
    assert bucket(0.5, 10) == 4  # 4.5 rounds to even
    assert bucket(0.5, 5) == 2
    assert bucket(0.625, 5) == 2  # 2.5 -> 2
    assert bucket(0.875, 5) == 4  # 3.5 -> 4
    with pytest.raises(ValueError):
        bucket(1.01, 10)


def test_render_is_canonical_order_without_spaces():
    schema = AttributeSchema(STEERABLE)
    assert schema.render({"humor": 4, "toxicity": 0, "quality": 9}) == "quality:9,toxicity:0,humor:4"
    assert AttributeSchema(PAPER).names[:3] == ("quality", "toxicity", "humor")


def test_parse_round_trip_and_errors():
    schema = AttributeSchema(STEERABLE, levels=10)
    text = "quality:9,toxicity:0,humor:4,creativity:0"
    assert schema.render(schema.parse(text)) == text
    for bad, needle in [
        ("quality:9,quality:8", "duplicate"),
        ("qualty:9", "unknown attribute 'qualty'"),
        ("quality:nine", "not a non-negative integer"),
        ("quality:10", "out of range 0..9"),
        ("quality:-1", "not a non-negative integer"),
        ("quality", "malformed pair"),
        ("quality:9,", "malformed pair"),
        ("quality:9, humor:1", "unknown attribute ' humor'"),
    ]:
        with pytest.raises(UserError, match=needle):
            schema.parse(bad)
    assert schema.parse("spam:1,quality:3", ignore_unknown=True) == {"quality": 3}


def test_defaults_and_validation():
    schema = AttributeSchema(("quality", "toxicity", "humor", "helpfulness"), levels=5)
    assert schema.defaults() == {"quality": 4, "toxicity": 0, "humor": 0, "helpfulness": 4}
    assert schema.with_defaults({"humor": 3}) == {"quality": 4, "toxicity": 0, "humor": 3, "helpfulness": 4}
    with pytest.raises(UserError, match="out of range"):
        schema.with_defaults({"humor": 5})
    with pytest.raises(UserError, match="must be an integer"):
        schema.validate({"humor": 2.5})


def test_schema_checks_and_named_sets():
    assert AttributeSchema("paper").names == canonical_order(PAPER)
    assert AttributeSchema(("verbosity", "quality")).names == ("quality", "verbosity")
    with pytest.raises(ValueError):
        AttributeSchema(("quality", "quality"))
    with pytest.raises(ValueError):
        AttributeSchema(("quality",), levels=1)
    assert AttributeSchema.from_dict(AttributeSchema(PAPER, 5).to_dict()) == AttributeSchema(PAPER, 5)


def test_parse_assignment():
    assert parse_assignment("humor=7") == ("humor", 7)
    with pytest.raises(UserError):
        parse_assignment("humor:7")
