"""Tests for kmip_core.reasons: one test per row of the table from
failures to Result Reasons (KMIP 1.4, 11.6; KMIP 2.0, 11.6)."""

from __future__ import annotations

import pytest
from kmip.core.enums import ResultReason as R

from kmip_core import errors
from kmip_core.reasons import GENERAL_FAILURE_MESSAGE, REASONS, result_reason

# Written out independently of REASONS so that a changed row fails here.
EXPECTED = {
    errors.ItemNotFound: (R.ITEM_NOT_FOUND, R.ITEM_NOT_FOUND),
    errors.PermissionDenied: (R.PERMISSION_DENIED, R.PERMISSION_DENIED),
    errors.IllegalOperation: (R.ILLEGAL_OPERATION, R.WRONG_KEY_LIFECYCLE_STATE),
    errors.InvalidField: (R.INVALID_FIELD, R.INVALID_FIELD),
    errors.MissingData: (R.MISSING_DATA, R.MISSING_DATA),
    errors.InvalidMessage: (R.INVALID_MESSAGE, R.INVALID_MESSAGE),
    errors.OperationNotSupported: (
        R.OPERATION_NOT_SUPPORTED,
        R.OPERATION_NOT_SUPPORTED,
    ),
    errors.FeatureNotSupported: (R.FEATURE_NOT_SUPPORTED, R.FEATURE_NOT_SUPPORTED),
    errors.CryptographicFailure: (R.CRYPTOGRAPHIC_FAILURE, R.CRYPTOGRAPHIC_FAILURE),
    errors.KeyFormatTypeNotSupported: (
        R.KEY_FORMAT_TYPE_NOT_SUPPORTED,
        R.KEY_FORMAT_TYPE_NOT_SUPPORTED,
    ),
    errors.KeyValueNotPresent: (R.KEY_VALUE_NOT_PRESENT, R.KEY_VALUE_NOT_PRESENT),
    errors.IndexOutOfBounds: (R.INDEX_OUT_OF_BOUNDS, R.INDEX_OUT_OF_BOUNDS),
    errors.ResponseTooLarge: (R.RESPONSE_TOO_LARGE, R.RESPONSE_TOO_LARGE),
    errors.AuthenticationNotSuccessful: (
        R.AUTHENTICATION_NOT_SUCCESSFUL,
        R.AUTHENTICATION_NOT_SUCCESSFUL,
    ),
    errors.ObjectAlreadyExists: (R.OBJECT_ALREADY_EXISTS, R.OBJECT_ALREADY_EXISTS),
    errors.AttestationRequired: (R.ATTESTATION_REQUIRED, R.ATTESTATION_REQUIRED),
    errors.AttestationFailed: (R.ATTESTATION_FAILED, R.ATTESTATION_FAILED),
    errors.AttributeNotFound: (R.ITEM_NOT_FOUND, R.ATTRIBUTE_NOT_FOUND),
    errors.AttributeReadOnly: (R.PERMISSION_DENIED, R.ATTRIBUTE_READ_ONLY),
    errors.AttributeSingleValued: (R.INVALID_FIELD, R.ATTRIBUTE_SINGLE_VALUED),
    errors.OutcomeUnknown: (R.GENERAL_FAILURE, R.GENERAL_FAILURE),
    errors.GeneralFailure: (R.GENERAL_FAILURE, R.GENERAL_FAILURE),
    errors.IntegrityFailure: (R.GENERAL_FAILURE, R.GENERAL_FAILURE),
    errors.IncompatibleUsageMask: (R.PERMISSION_DENIED, R.INCOMPATIBLE_CRYPTOGRAPHIC_USAGE_MASK),
    errors.NonUniqueName: (R.INVALID_FIELD, R.NON_UNIQUE_NAME_ATTRIBUTE),
    errors.ObjectDestroyed: (R.KEY_VALUE_NOT_PRESENT, R.OBJECT_DESTROYED),
    errors.LifecycleRefused: (R.ILLEGAL_OPERATION, R.WRONG_KEY_LIFECYCLE_STATE),
}

# Reasons that KMIP 1.x does not define: a 1.x client must never get one.
ONLY_IN_2_0 = {
    R.WRONG_KEY_LIFECYCLE_STATE,
    R.ATTRIBUTE_NOT_FOUND,
    R.ATTRIBUTE_READ_ONLY,
    R.ATTRIBUTE_SINGLE_VALUED,
    R.INCOMPATIBLE_CRYPTOGRAPHIC_USAGE_MASK,
    R.NON_UNIQUE_NAME_ATTRIBUTE,
    R.OBJECT_DESTROYED,
}


def test_every_kms_error_has_a_row():
    defined = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.KmsError)
    } - {errors.KmsError}
    assert set(REASONS) == defined == set(EXPECTED)


@pytest.mark.parametrize("exc_class", list(EXPECTED), ids=lambda c: c.__name__)
def test_kmip_1_x_reason(exc_class):
    reason, text = result_reason(exc_class("what went wrong"), 1)
    assert reason == EXPECTED[exc_class][0]
    assert reason not in ONLY_IN_2_0
    assert text == "what went wrong"


@pytest.mark.parametrize("exc_class", list(EXPECTED), ids=lambda c: c.__name__)
def test_kmip_2_0_reason(exc_class):
    reason, text = result_reason(exc_class("what went wrong"), 2)
    assert reason == EXPECTED[exc_class][1]
    assert text == "what went wrong"


@pytest.mark.parametrize("exc_class", list(EXPECTED), ids=lambda c: c.__name__)
def test_kmip_2_1_reason(exc_class):
    """2.1 answers like 2.0 except that a missing object is Object Not Found."""
    reason, _ = result_reason(exc_class("what went wrong"), 2, 1)
    expected = R.OBJECT_NOT_FOUND if exc_class is errors.ItemNotFound else EXPECTED[exc_class][1]
    assert reason == expected
    assert result_reason(exc_class("x"), 2, 0)[0] == EXPECTED[exc_class][1]


def test_subclass_maps_like_its_parent():
    class NoSuchKey(errors.ItemNotFound):
        pass

    assert result_reason(NoSuchKey("x"), 2) == (R.ITEM_NOT_FOUND, "x")


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("database password is hunter2"), KeyError("k"), ValueError("v")],
)
def test_non_kms_error_is_general_failure_with_empty_text(exc):
    for major in (1, 2):
        assert result_reason(exc, major) == (R.GENERAL_FAILURE, "")


def test_bare_kms_error_is_general_failure():
    assert result_reason(errors.KmsError("unclassified"), 2)[0] == R.GENERAL_FAILURE


def test_general_failure_message_names_the_request():
    text = GENERAL_FAILURE_MESSAGE.format(request_id="0123abcd")
    assert "0123abcd" in text


@pytest.mark.parametrize(
    "version, before_1_4, expected",
    [
        ((1, 3), errors.IllegalOperation, errors.IllegalOperation),
        ((1, 3), errors.PermissionDenied, errors.PermissionDenied),
        ((1, 4), errors.IllegalOperation, errors.PermissionDenied),
        ((2, 0), errors.IllegalOperation, errors.PermissionDenied),
        ((2, 1), errors.PermissionDenied, errors.IllegalOperation),
    ],
)
def test_lifecycle_refusal_is_answered_per_version(version, before_1_4, expected):
    """The profiles' test cases: Permission Denied at 1.4 and 2.0, Wrong Key
    Lifecycle State (IllegalOperation at 2.x) at 2.1."""
    answered = errors.LifecycleRefused("no", before_1_4).for_version(version)
    assert type(answered) is expected and answered.message == "no"
