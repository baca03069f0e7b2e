"""Failures that reach a KMIP client.

Every layer below dispatch raises one of these; `kmip_core.reasons`
is the one place that turns them into a Result Status and Result Reason.
Messages are safe to send to the client: they never carry key material and
never say whether an object the caller may not see exists.
"""


class KmsError(Exception):
    """Base class. `message` is sent to the client as the Result Message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ItemNotFound(KmsError):
    """No such object, or one the caller may not see."""


class PermissionDenied(KmsError):
    """The caller may see the object but not do this to it."""


class IllegalOperation(KmsError):
    """The object is in a lifecycle state that forbids the operation."""


class InvalidField(KmsError):
    """A field has a value the server does not accept."""


class MissingData(KmsError):
    """A required field is absent."""


class InvalidMessage(KmsError):
    """The message does not parse as a KMIP request."""


class OperationNotSupported(KmsError):
    """The server does not implement this operation."""


class FeatureNotSupported(KmsError):
    """A request option the server does not implement."""


class CryptographicFailure(KmsError):
    """A cryptographic operation failed (bad tag, bad signature, bad key)."""


class KeyFormatTypeNotSupported(KmsError):
    """The requested Key Format Type cannot be produced for this object."""


class KeyValueNotPresent(KmsError):
    """The object's key material was destroyed."""


class ObjectDestroyed(KeyValueNotPresent):
    """The key material is gone because the object was destroyed; Get
    raises it at 2.1, which has a Result Reason of its own for it."""


class IndexOutOfBounds(KmsError):
    """An Attribute Index that names no value."""


class ResponseTooLarge(KmsError):
    """The response would exceed the client's Maximum Response Size."""


class AuthenticationNotSuccessful(KmsError):
    """The request's Credential was missing or wrong."""

    # Who tried (a kmip_core.policy.Principal, which imports this module),
    # when the dispatcher knows: for the audit record.
    principal: object = None


class AttestationRequired(KmsError):
    """The server requires an attestation the request did not carry (KMIP
    1.2 and later): the vTPM broker's gateway, from a host that must attest."""


class AttestationFailed(KmsError):
    """The attestation the request carried is not accepted (KMIP 1.2 and
    later): unknown, expired, or no longer matching the host's boot."""


class ObjectAlreadyExists(KmsError):
    """A unique value (such as a Name) is already taken."""


class AttributeNotFound(KmsError):
    """An attribute the request names is not set on the object."""


class AttributeReadOnly(KmsError):
    """The client may not set or change this attribute."""


class AttributeSingleValued(KmsError):
    """A second value for an attribute that takes only one."""


class NonUniqueName(KmsError):
    """A Name the object already carries, given again."""


class IncompatibleUsageMask(KmsError):
    """The object's Cryptographic Usage Mask does not allow what a Check
    asked about."""


class GeneralFailure(KmsError):
    """A request the server refuses for a reason no other Result Reason
    names, where the profiles' test cases answer General Failure (a GCM Tag
    Length outside 12-16 bytes on Encrypt). The message describes the
    request, never the server's internals."""


class IntegrityFailure(GeneralFailure):
    """An object's stored row fails its authentication (edited, replayed or
    rolled back outside the server): refused, never served."""


class OutcomeUnknown(KmsError):
    """The database connection was lost while committing: the change may or
    may not be stored. Answered GENERAL_FAILURE, never success."""


class LifecycleRefused(IllegalOperation):
    """The object's state or dates forbid the operation (Destroy of an Active
    object, a new Activation Date once the object left Pre-Active, a use
    outside the Process Start / Protect Stop window). The OASIS profile test
    cases answer these per version: Permission Denied at 1.4 and 2.0, Wrong
    Key Lifecycle State at 2.1. Versions before 1.4 keep `before_1_4`, what
    this server answered before the profiles were followed. The operation
    raises `for_version(ctx.version)`; this class never reaches dispatch."""

    def __init__(self, message: str, before_1_4: type[KmsError] = IllegalOperation):
        super().__init__(message)
        self.before_1_4 = before_1_4

    def for_version(self, version: tuple[int, int]) -> KmsError:
        if version >= (2, 1):
            return IllegalOperation(self.message)  # Wrong Key Lifecycle State at 2.x.
        if version >= (1, 4):
            return PermissionDenied(self.message)
        return self.before_1_4(self.message)
