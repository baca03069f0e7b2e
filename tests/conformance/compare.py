"""Compare a server's response (TTLV items) with the ResponseMessage a test
case expects (XML), and report the first differing field with its path.

What is compared how:

- Placeholders (`$UNIQUE_IDENTIFIER_0`, `$IV_COUNTER_NONCE`, ...) bind to
  the server's value on first sight and must be equal on every later one.
- `$NOW`, `$NOW-3600`: a DateTime within `tolerance` seconds of the time
  the request was sent, plus the offset.
- Values the server chooses are checked for presence and type only: time
  stamps, result messages, vendor identification and server information,
  IVs/nonces and correlation values it returns, and everything that
  depends on key material the server generated in this flow (key material,
  digests, ciphertext, signatures, MACs, tags). Randomised outputs
  (an Encrypt whose IV the server picked, RSA encryption, signatures) are
  server-chosen too. When such a value is a literal in the test case, the
  literal is remembered with the server's value, so that a later request
  that quotes the literal (decrypt the ciphertext, verify the signature)
  quotes the server's value instead.
- A Result Message the test case does not show is allowed (it is optional
  and free text).
- Query's answer is the server's own capability list: every kind of item
  the test case shows (Operation, Object Type, ...) must be there, the
  values are the server's.
- Attribute lists (1.x Attribute structures in a payload, 2.x Attributes
  structures, the names or references of Get Attribute List) are compared
  as sets: order carries no meaning there.
- Everything else is compared exactly: tags, types, values, item counts
  and order.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from conformance import kmip_xml
from kmip.core.enums import ObjectType, Operation, Tags

from kmip_core.ttlv import Item, ItemType, tag_name, walk

T = Tags

# Values the server always chooses.
_ALWAYS_LOOSE = {
    T.TIME_STAMP.value,
    T.RESULT_MESSAGE.value,
    T.VENDOR_IDENTIFICATION.value,
    T.SERVER_INFORMATION.value,
    T.CORRELATION_VALUE.value,
    T.SERVER_CORRELATION_VALUE.value,
    # Describes the server's own generator.
    T.RANDOM_NUMBER_GENERATOR.value,
}
# Outputs that depend on the key (or on randomness the server adds).
_KEY_DEPENDENT = {
    T.KEY_MATERIAL.value,
    T.KEY_VALUE.value,
    T.DIGEST_VALUE.value,
    T.DATA.value,
    T.SIGNATURE_DATA.value,
    T.MAC_DATA.value,
    T.AUTHENTICATED_ENCRYPTION_TAG.value,
    T.IV_COUNTER_NONCE.value,
}
# Operations whose new objects carry key material the server generated.
GENERATING = {
    Operation.CREATE.value,
    Operation.CREATE_KEY_PAIR.value,
    Operation.REKEY.value,
    Operation.REKEY_KEY_PAIR.value,
    Operation.DERIVE_KEY.value,
    Operation.CREATE_SPLIT_KEY.value,
    Operation.JOIN_SPLIT_KEY.value,
}
_UID_TAGS = {
    T.UNIQUE_IDENTIFIER.value,
    T.PRIVATE_KEY_UNIQUE_IDENTIFIER.value,
    T.PUBLIC_KEY_UNIQUE_IDENTIFIER.value,
}
# Structures whose content is the server's own description of itself.
_PRESENCE_ONLY = {T.RANDOM_NUMBER_GENERATOR.value, T.SERVER_INFORMATION.value}
_ASYMMETRIC = {ObjectType.PUBLIC_KEY.value, ObjectType.PRIVATE_KEY.value}


@dataclass
class FlowState:
    """What a flow has learnt so far: placeholder values, server-chosen
    bytes quoted later, the objects whose key material the server made,
    and the object type of every object it knows."""

    bindings: dict[str, object] = field(default_factory=dict)
    substitutions: dict[bytes, bytes] = field(default_factory=dict)
    generated: set[str] = field(default_factory=set)
    object_types: dict[str, int] = field(default_factory=dict)
    own_values: set[bytes] = field(default_factory=set)
    # The last value of each tag seen in a response, for placeholders a
    # test case uses in a request without binding them first ($DATA_0 for
    # the ciphertext of the Encrypt before).
    last_values: dict[int, object] = field(default_factory=dict)

    def bind_unbound(self, request) -> None:
        for el in request.iter():
            text = el.get("value")
            if not kmip_xml.is_placeholder(text) or text[1:] in self.bindings:
                continue
            name = re.sub(r"_\d+$", "", text[1:])
            tag = kmip_xml.TAGS.get(kmip_xml.norm(name))
            if tag is not None and tag.value in self.last_values:
                self.bindings[text[1:]] = self.last_values[tag.value]

    def remember(self, item: Item) -> None:
        for child in walk(item):
            if child.type != ItemType.STRUCTURE:
                self.last_values[child.tag] = child.value


class Difference(Exception):
    def __init__(self, path: str, text: str):
        super().__init__(f"{path}: {text}")
        self.path = path
        self.text = text


@dataclass
class _ItemScope:
    """Per batch item: which leaf tags hold server-chosen values."""

    loose: frozenset[int]
    query: bool = False


def _display(value) -> str:
    if isinstance(value, bytes):
        return value.hex() if len(value) <= 32 else value[:32].hex() + f"...({len(value)} bytes)"
    return repr(value)


def _expected_display(element: ET.Element) -> str:
    return f"{element.tag} {element.get('type', 'Structure')} {element.get('value', '')!r}"


class Comparator:
    def __init__(self, state: FlowState, now: float, tolerance: float = 120.0):
        self._client_correlation = None
        self.state = state
        self.now = now
        self.tolerance = tolerance

    # Entry point.
    def message(self, expected: ET.Element, actual: Item | None, request: Item | None = None) -> None:
        if request is not None:
            self._learn_request(request)
        if actual is None:
            raise Difference("ResponseMessage", "no response (the server closed the connection)")
        self.state.remember(actual)
        self._check_tag(expected, actual, "ResponseMessage")
        path = "ResponseMessage"
        exp_children = list(expected)
        act_children = list(actual.children())
        header_exp = next((c for c in exp_children if c.tag == "ResponseHeader"), None)
        header_act = actual.find(T.RESPONSE_HEADER.value)
        if header_exp is not None:
            header_scope = _ItemScope(frozenset({T.SERVER_CORRELATION_VALUE.value}))
            self._node(header_exp, header_act, f"{path}/ResponseHeader", header_scope, expected)
        exp_items = [c for c in exp_children if c.tag == "BatchItem"]
        act_items = [c for c in act_children if c.tag == T.BATCH_ITEM.value]
        registered = getattr(self, "_registered", [])
        for i, (exp_item, act_item) in enumerate(zip(exp_items, act_items, strict=False)):
            payload = act_item.find(T.RESPONSE_PAYLOAD.value)
            if i < len(registered) and registered[i] is not None and payload is not None:
                uid = payload.get(T.UNIQUE_IDENTIFIER.value)
                if isinstance(uid, str):
                    self.state.object_types[uid] = registered[i]
            foreign = getattr(self, "_foreign_input", [])
            self._foreign = i < len(foreign) and foreign[i]
            self._batch_item(exp_item, act_item, f"{path}/BatchItem[{i}]")
        if len(exp_items) != len(act_items):
            raise Difference(path, f"{len(exp_items)} BatchItem expected, {len(act_items)} returned")

    def _learn_request(self, request: Item) -> None:
        """Object types that only the request states (Register)."""
        header = request.find(T.REQUEST_HEADER.value)
        self._client_correlation = None if header is None else header.get(T.CLIENT_CORRELATION_VALUE.value)
        self._registered = []
        self._foreign_input = []
        for item in request.find_all(T.BATCH_ITEM.value):
            payload = item.find(T.REQUEST_PAYLOAD.value)
            data = None if payload is None else payload.get(T.DATA.value)
            # Input this server never produced (the reference server's
            # ciphertext) cannot decrypt to the expected plaintext under a
            # key this server generated.
            self._foreign_input.append(isinstance(data, bytes) and data not in self.state.own_values)
            if item.get(T.OPERATION.value) == Operation.REGISTER.value and payload is not None:
                self._registered.append(payload.get(T.OBJECT_TYPE.value))
            else:
                self._registered.append(None)

    def _batch_item(self, expected: ET.Element, actual: Item, path: str) -> None:
        operation = actual.get(T.OPERATION.value)
        payload = actual.find(T.RESPONSE_PAYLOAD.value)
        uids = []
        if payload is not None:
            uids = [c.value for c in payload.children() if c.tag in _UID_TAGS and isinstance(c.value, str)]
        if operation in GENERATING and actual.get(T.RESULT_STATUS.value) == 0:
            self.state.generated.update(uids)
        loose = set(_ALWAYS_LOOSE)
        generated = any(u in self.state.generated for u in uids)
        asymmetric = any(self.state.object_types.get(u) in _ASYMMETRIC for u in uids)
        iv_returned = payload is not None and payload.find(T.IV_COUNTER_NONCE.value) is not None
        if generated:
            loose |= _KEY_DEPENDENT
        if operation == Operation.ENCRYPT.value and (iv_returned or asymmetric):
            loose |= _KEY_DEPENDENT
        if operation == Operation.SIGN.value:
            loose |= {T.SIGNATURE_DATA.value}
        if operation in (Operation.RNG_RETRIEVE.value,):
            loose |= {T.DATA.value}
        if operation == Operation.DECRYPT.value and not (generated and self._foreign):
            # The recovered plaintext must be right.
            loose -= {T.DATA.value}
        loose.add(T.IV_COUNTER_NONCE.value)
        scope = _ItemScope(frozenset(loose), query=operation == Operation.QUERY.value)
        try:
            self._node(expected, actual, path, scope, None)
        except Difference as exc:
            # Say why the server refused what the test case expects to work.
            message = actual.get(T.RESULT_MESSAGE.value)
            if actual.get(T.RESULT_STATUS.value) != 0 and isinstance(message, str):
                raise Difference(exc.path, f"{exc.text} (server: {message!r})") from None
            raise
        if payload is not None:
            object_type = payload.get(T.OBJECT_TYPE.value)
            for u in uids:
                if isinstance(object_type, int):
                    self.state.object_types.setdefault(u, object_type)
            if payload.find(T.PRIVATE_KEY_UNIQUE_IDENTIFIER.value) is not None:
                self.state.object_types[payload.get(T.PRIVATE_KEY_UNIQUE_IDENTIFIER.value)] = ObjectType.PRIVATE_KEY.value
                self.state.object_types[payload.get(T.PUBLIC_KEY_UNIQUE_IDENTIFIER.value)] = ObjectType.PUBLIC_KEY.value

    # Recursive comparison.
    def _check_tag(self, expected: ET.Element, actual: Item, path: str) -> None:
        tag = kmip_xml.tag_of(expected)
        if actual.tag != tag:
            raise Difference(path, f"expected {expected.tag}, got {tag_name(actual.tag)}")
        item_type = kmip_xml.type_of(expected)
        if actual.type != item_type:
            raise Difference(path, f"expected type {item_type.name}, got {actual.type.name}")

    def _node(self, expected: ET.Element, actual: Item | None, path: str, scope: _ItemScope, parent) -> None:
        if actual is None:
            raise Difference(path, "missing")
        self._check_tag(expected, actual, path)
        if actual.tag in scope.loose or _presence_only(expected, parent):
            if actual.tag in _PRESENCE_ONLY or _presence_only(expected, parent):
                return  # Presence only: it describes the server's generator.
            self._loose(expected, actual, path)
            return
        if actual.type == ItemType.STRUCTURE:
            if scope.query and actual.tag == T.RESPONSE_PAYLOAD.value:
                self._query_payload(expected, actual, path)
                return
            self._children(expected, actual, path, scope)
            return
        self._leaf(expected, actual, path, parent)

    def _children(self, expected: ET.Element, actual: Item, path: str, scope: _ItemScope) -> None:
        exp = list(expected)
        act = list(actual.children())
        # A Result Message the test case leaves out is allowed, and so are
        # the client's own Client Correlation Value echoed in the header and
        # the server's Server Correlation Value (all optional in a response;
        # only the BL-M 2.1 cases show the reference server's one).
        if not any(e.tag == "ResultMessage" for e in exp):
            act = [a for a in act if a.tag != T.RESULT_MESSAGE.value]
        if actual.tag == T.RESPONSE_HEADER.value and not any(e.tag == "ClientCorrelationValue" for e in exp):
            act = [
                a
                for a in act
                if not (a.tag == T.CLIENT_CORRELATION_VALUE.value and a.value == self._client_correlation)
            ]
        # An Attribute Index of 0 says what its absence says (KMIP 1.4,
        # 2.1.1: "If the Attribute Index is not specified it is assumed to
        # be 0"); the server gives it for multi-instance attributes in 1.x
        # Modify/Delete Attribute answers, which the test cases omit.
        if actual.tag == T.ATTRIBUTE.value and not any(e.tag == "AttributeIndex" for e in exp):
            act = [a for a in act if not (a.tag == T.ATTRIBUTE_INDEX.value and a.value == 0)]
        if actual.tag == T.RESPONSE_HEADER.value and not any(e.tag == "ServerCorrelationValue" for e in exp):
            act = [a for a in act if a.tag != T.SERVER_CORRELATION_VALUE.value]
        # Get Attribute List answers names (1.x) or references (2.x) whose
        # order carries no meaning either.
        unordered = (
            actual.tag == T.ATTRIBUTES.value
            or any(e.tag == "Attribute" for e in exp)
            or (actual.tag == T.RESPONSE_PAYLOAD.value and any(e.tag in ("AttributeName", "AttributeReference") for e in exp))
        )
        if unordered:
            self._unordered(exp, act, expected, path, scope)
            return
        counts: dict[str, int] = {}
        for i, e in enumerate(exp):
            n = counts.get(e.tag, 0)
            counts[e.tag] = n + 1
            child_path = f"{path}/{e.tag}" + (f"[{n}]" if n else "")
            if i >= len(act):
                raise Difference(child_path, f"missing (expected {_expected_display(e)})")
            self._node(e, act[i], child_path, scope, expected)
        if len(act) > len(exp):
            extra = act[len(exp)]
            raise Difference(f"{path}/{tag_name(extra.tag)}", f"unexpected item {extra!r}")

    def _unordered(self, exp, act, parent: ET.Element, path: str, scope: _ItemScope) -> None:
        remaining = list(act)
        for n, e in enumerate(exp):
            child_path = f"{path}/{e.tag}[{n}]"
            label = _attribute_label(e)
            if label:
                child_path += f"({label})"
            first_error = None
            for candidate in remaining:
                if candidate.tag != kmip_xml.tag_of(e):
                    continue
                saved = (dict(self.state.bindings), dict(self.state.substitutions))
                try:
                    self._node(e, candidate, child_path, scope, parent)
                except Difference as exc:
                    self.state.bindings, self.state.substitutions = saved
                    if label and _same_label(_attribute_label_item(candidate), label):
                        first_error = first_error or exc
                    continue
                remaining.remove(candidate)
                break
            else:
                if first_error is not None:
                    raise first_error
                raise Difference(child_path, f"missing (expected {_expected_display(e)})")
        if remaining:
            extra = remaining[0]
            label = _attribute_label_item(extra)
            raise Difference(f"{path}/{tag_name(extra.tag)}", f"unexpected item {label or repr(extra)}")

    def _query_payload(self, expected: ET.Element, actual: Item, path: str) -> None:
        kinds = {kmip_xml.tag_of(e) for e in expected}
        present = {a.tag for a in actual.children()}
        for e in expected:
            if kmip_xml.tag_of(e) not in present:
                raise Difference(f"{path}/{e.tag}", "missing (Query answers with none of these)")
        del kinds

    def _loose(self, expected: ET.Element, actual: Item, path: str) -> None:
        """Presence and type only; remember literal bytes the server replaced."""
        text = expected.get("value")
        if kmip_xml.is_placeholder(text):
            self._bind(text[1:], actual, path)
            return
        if actual.type == ItemType.STRUCTURE:
            self._shape(expected, actual, path)
            return
        if actual.type == ItemType.BYTE_STRING:
            self.state.own_values.add(actual.value)
        if actual.type == ItemType.BYTE_STRING and text:
            literal = bytes.fromhex(text)
            if literal != actual.value:
                self.state.substitutions[literal] = actual.value

    def _shape(self, expected: ET.Element, actual: Item, path: str) -> None:
        """Same tags and types all the way down, any values."""
        exp = list(expected)
        act = list(actual.children())
        for i, e in enumerate(exp):
            if i >= len(act):
                raise Difference(f"{path}/{e.tag}", "missing")
            self._check_tag(e, act[i], f"{path}/{e.tag}")
            if act[i].type == ItemType.STRUCTURE:
                self._shape(e, act[i], f"{path}/{e.tag}")
            else:
                self._loose(e, act[i], f"{path}/{e.tag}")
        if len(act) > len(exp):
            raise Difference(f"{path}/{tag_name(act[len(exp)].tag)}", "unexpected item")

    def _bind(self, name: str, actual: Item, path: str) -> None:
        bound = self.state.bindings.get(name)
        if bound is None:
            self.state.bindings[name] = actual.value
            if isinstance(actual.value, bytes):
                self.state.own_values.add(actual.value)
            return
        if bound != actual.value:
            raise Difference(path, f"${name} is {_display(bound)} earlier in the flow, here {_display(actual.value)}")

    def _leaf(self, expected: ET.Element, actual: Item, path: str, parent) -> None:
        text = expected.get("value", "")
        if kmip_xml.is_placeholder(text):
            self._bind(text[1:], actual, path)
            return
        at_now = kmip_xml.now_value(text, self.now)
        if at_now is not None:
            if abs(actual.value - at_now) > self.tolerance:
                raise Difference(path, f"expected {text} (about {at_now}), got {actual.value} ({actual.value - at_now:+d} s)")
            return
        try:
            want = kmip_xml.leaf_value(actual.type, text, expected.tag, self.now, kmip_xml.attribute_name_for(parent))
        except kmip_xml.VectorError as exc:
            raise Difference(path, f"cannot read the expected value: {exc}") from None
        if want != actual.value:
            raise Difference(path, f"expected {_describe(expected, want)}, got {_describe_item(expected, actual, parent)}")


def _presence_only(expected: ET.Element, parent) -> bool:
    return expected.tag == "AttributeValue" and kmip_xml.attribute_name_for(parent) == "Random Number Generator"


def _describe(expected: ET.Element, value) -> str:
    if expected.get("type") == "Enumeration":
        return f"{expected.get('value')} ({value:#x})"
    return _display(value)


def _describe_item(expected: ET.Element, actual: Item, parent) -> str:
    if actual.type == ItemType.ENUMERATION:
        cls = kmip_xml.enum_class(expected.tag, kmip_xml.attribute_name_for(parent))
        try:
            return f"{cls(actual.value).name} ({actual.value:#x})"
        except (TypeError, ValueError):
            return f"{actual.value:#x}"
    return _display(actual.value)


def _attribute_label(element: ET.Element) -> str | None:
    name = element.find("AttributeName")
    if name is not None:
        return name.get("value")
    if element.tag != "Attribute" and element.get("type") is not None or len(element):
        return element.tag
    return None


def _same_label(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and kmip_xml.norm(a) == kmip_xml.norm(b)


def _attribute_label_item(item: Item) -> str | None:
    name = item.get(T.ATTRIBUTE_NAME.value)
    if isinstance(name, str):
        return name
    return tag_name(item.tag)
