"""`vtpm-drill`: the whole story of issue 6 on 127.0.0.1 with real processes.

A KMS, the broker, management instance A, hosts and VMs with real vTPMs;
then A is lost and revoked, and instance B recovers every VM from the
datastore alone. The drill proves the recovery: same NV secret, same EK
certificate (chaining to the broker's EK CA), same KEK.

- `processes`: start kms-server and vtpm-broker the way an operator does,
  and run the command-line tools (also used by the integration tests).
- `guest`: the guest's side, tpm2-tools against a vTPM's swtpm socket.
- `cli`: the `vtpm-drill` command.
"""
