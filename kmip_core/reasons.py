"""The one table from failures to KMIP Result Reasons (KMIP 1.4, 11.6).

2.0 added more precise reasons for some attribute failures; a 1.x client
gets the closest 1.x reason instead, because a 1.x decoder would reject an
enumeration value its version does not define.
"""

from __future__ import annotations

import enum
import os

from kmip.core.enums import ResultReason

from kmip_core import errors

# Exception class -> (reason for 1.x, reason for 2.0).
REASONS: dict[type[errors.KmsError], tuple[ResultReason, ResultReason]] = {
    errors.ItemNotFound: (ResultReason.ITEM_NOT_FOUND, ResultReason.ITEM_NOT_FOUND),
    errors.PermissionDenied: (ResultReason.PERMISSION_DENIED, ResultReason.PERMISSION_DENIED),
    errors.IllegalOperation: (ResultReason.ILLEGAL_OPERATION, ResultReason.WRONG_KEY_LIFECYCLE_STATE),
    errors.InvalidField: (ResultReason.INVALID_FIELD, ResultReason.INVALID_FIELD),
    errors.MissingData: (ResultReason.MISSING_DATA, ResultReason.MISSING_DATA),
    errors.InvalidMessage: (ResultReason.INVALID_MESSAGE, ResultReason.INVALID_MESSAGE),
    errors.OperationNotSupported: (ResultReason.OPERATION_NOT_SUPPORTED, ResultReason.OPERATION_NOT_SUPPORTED),
    errors.FeatureNotSupported: (ResultReason.FEATURE_NOT_SUPPORTED, ResultReason.FEATURE_NOT_SUPPORTED),
    errors.CryptographicFailure: (ResultReason.CRYPTOGRAPHIC_FAILURE, ResultReason.CRYPTOGRAPHIC_FAILURE),
    errors.KeyFormatTypeNotSupported: (
        ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED,
        ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED,
    ),
    errors.KeyValueNotPresent: (ResultReason.KEY_VALUE_NOT_PRESENT, ResultReason.KEY_VALUE_NOT_PRESENT),
    errors.IndexOutOfBounds: (ResultReason.INDEX_OUT_OF_BOUNDS, ResultReason.INDEX_OUT_OF_BOUNDS),
    errors.ResponseTooLarge: (ResultReason.RESPONSE_TOO_LARGE, ResultReason.RESPONSE_TOO_LARGE),
    errors.AuthenticationNotSuccessful: (
        ResultReason.AUTHENTICATION_NOT_SUCCESSFUL,
        ResultReason.AUTHENTICATION_NOT_SUCCESSFUL,
    ),
    errors.ObjectAlreadyExists: (ResultReason.OBJECT_ALREADY_EXISTS, ResultReason.OBJECT_ALREADY_EXISTS),
    errors.AttestationRequired: (ResultReason.ATTESTATION_REQUIRED, ResultReason.ATTESTATION_REQUIRED),
    errors.AttestationFailed: (ResultReason.ATTESTATION_FAILED, ResultReason.ATTESTATION_FAILED),
    errors.AttributeNotFound: (ResultReason.ITEM_NOT_FOUND, ResultReason.ATTRIBUTE_NOT_FOUND),
    errors.AttributeReadOnly: (ResultReason.PERMISSION_DENIED, ResultReason.ATTRIBUTE_READ_ONLY),
    errors.AttributeSingleValued: (ResultReason.INVALID_FIELD, ResultReason.ATTRIBUTE_SINGLE_VALUED),
    errors.OutcomeUnknown: (ResultReason.GENERAL_FAILURE, ResultReason.GENERAL_FAILURE),
    errors.GeneralFailure: (ResultReason.GENERAL_FAILURE, ResultReason.GENERAL_FAILURE),
    errors.IntegrityFailure: (ResultReason.GENERAL_FAILURE, ResultReason.GENERAL_FAILURE),
    errors.ObjectDestroyed: (ResultReason.KEY_VALUE_NOT_PRESENT, ResultReason.OBJECT_DESTROYED),
    errors.NonUniqueName: (ResultReason.INVALID_FIELD, ResultReason.NON_UNIQUE_NAME_ATTRIBUTE),
    errors.IncompatibleUsageMask: (ResultReason.PERMISSION_DENIED, ResultReason.INCOMPATIBLE_CRYPTOGRAPHIC_USAGE_MASK),
    # Operations answer it per minor version (LifecycleRefused.for_version);
    # this row is only the fallback should one escape.
    errors.LifecycleRefused: (ResultReason.ILLEGAL_OPERATION, ResultReason.WRONG_KEY_LIFECYCLE_STATE),
}

# KMIP 2.1 names a missing object Object Not Found (the OASIS 2.1 test case
# BL-M-4-21); 2.0 and 1.x keep Item Not Found.
FROM_2_1: dict[type[errors.KmsError], ResultReason] = {
    errors.ItemNotFound: ResultReason.OBJECT_NOT_FOUND,
}

GENERAL_FAILURE_MESSAGE = "internal error; see the server log for request {request_id}"


_ENUM_MODULE = os.path.normcase(os.path.abspath(enum.__file__))


def input_error(exc: BaseException) -> errors.KmsError | None:
    """The KmsError for a failure the request's own values caused below the
    checks an operation makes, or None for a real internal error.

    A value a KMIP enumeration does not define (Cryptographic Algorithm
    0xF3, say) fails where the Enum is constructed, which may be deep in a
    helper that trusted an earlier check. Wherever that happens it is the
    client's field, not a server fault: Invalid Field, no traceback. It is
    recognized by where the ValueError was raised (the enum module itself),
    so a ValueError of the server's own code is still a General Failure."""
    if not isinstance(exc, ValueError):
        return None
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    if os.path.normcase(os.path.abspath(tb.tb_frame.f_code.co_filename)) != _ENUM_MODULE:
        return None
    detail = str(exc) if len(str(exc)) <= 120 else "a value that is not defined"
    return errors.InvalidField(f"a field has a value this server does not define ({detail})")


def result_reason(exc: BaseException, major_version: int, minor_version: int = 0) -> tuple[ResultReason, str]:
    """The Result Reason and Result Message for a failure, in the protocol
    version of the response. Anything that is not a KmsError is a
    GENERAL_FAILURE whose text says nothing but the request id (the details
    go to the server log)."""
    if not isinstance(exc, errors.KmsError):  # the tables hold KmsError classes only
        return ResultReason.GENERAL_FAILURE, ""
    for cls in type(exc).__mro__:
        if (major_version, minor_version) >= (2, 1) and cls in FROM_2_1:
            return FROM_2_1[cls], exc.message
        if cls in REASONS:
            pair = REASONS[cls]
            return (pair[1] if major_version >= 2 else pair[0]), exc.message
    return ResultReason.GENERAL_FAILURE, ""
