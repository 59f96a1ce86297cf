"""Hypothesis strategies that build protobuf messages of any type from their descriptors."""

from google.protobuf import descriptor, message_factory, struct_pb2
from google.protobuf.message import Message
from hypothesis import strategies as st

FieldDescriptor = descriptor.FieldDescriptor

# Strings that the services treat specially, mixed with random text.
TRICKY_TEXT = st.sampled_from(
    ["", ".", "..", "../x", "a/b", "%2e%2e", "\x00", "digits@0", "digits@-1", "kept@1", "ps-000000000000",
     "x" * 129, "s-000000000000", "adam", "val_loss", "X_train", "cpu:0", "gpu:99", "<f4", ">f8", "O"]
)
TEXT = st.one_of(TRICKY_TEXT, st.text(max_size=40), st.text(max_size=2000).map(lambda text: text * 3))

INTEGER_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(field_type: int) -> st.SearchStrategy[int]:
    low, high = INTEGER_RANGES[field_type]
    edges = [value for value in (low, high, -1, 0, 1, 2**31 - 1, 2**40) if low <= value <= high]
    return st.one_of(st.sampled_from(edges), st.integers(min_value=max(low, -1000), max_value=min(high, 1000)),
                     st.integers(min_value=low, max_value=high))


def scalar(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type in INTEGER_RANGES:
        return integers(field.type)
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        floats = st.floats(allow_nan=True, allow_infinity=True, width=64 if field.type == FieldDescriptor.TYPE_DOUBLE else 32)
        return st.one_of(floats, st.sampled_from([0.0, -1.0, 1e-3, 1e308]))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_STRING:
        return TEXT
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=300)
    if field.type == FieldDescriptor.TYPE_ENUM:
        # Values outside the enum are legal on the wire in proto3 and must be handled too.
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(min_value=-5, max_value=1000))
    raise TypeError(f"No strategy for field {field.full_name} of type {field.type}.")


def struct_values() -> st.SearchStrategy[dict]:
    leaves = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), TEXT)
    values = st.recursive(leaves, lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3), max_leaves=8)
    return st.dictionaries(TEXT, values, max_size=4)


@st.composite
def messages(draw, message_class: type[Message], depth: int = 0) -> Message:
    """Draw a message of ``message_class`` with random values in a random subset of its fields."""
    message = message_class()
    if message_class is struct_pb2.Struct:
        message.update(draw(struct_values()))
        return message
    for field in message_class.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        if field.containing_oneof is not None and message.WhichOneof(field.containing_oneof.name) is not None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            entries = draw(st.dictionaries(scalar(key_field), scalar(value_field), max_size=4))
            getattr(message, field.name).update(entries)
        elif field.message_type is not None:
            if depth >= 3:
                continue
            child_class = _message_class(message, field)
            if field.is_repeated:
                children = draw(st.lists(messages(child_class, depth + 1), max_size=3))
                getattr(message, field.name).extend(children)
            else:
                getattr(message, field.name).CopyFrom(draw(messages(child_class, depth + 1)))
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(scalar(field), max_size=6)))
        else:
            setattr(message, field.name, draw(scalar(field)))
    return message


def _message_class(message: Message, field: FieldDescriptor) -> type[Message]:
    return message_factory.GetMessageClass(field.message_type)
