"""NVMe constants: opcodes, status codes, feature ids, Identify CNS values, field bits (pure).

Sources: NVM Express Base Specification 2.1/2.2 (2.1 took in TP4159, host managed live
migration), NVM Command Set Specification 1.1, and where the migration commands' field layout is
concerned, DESIGN.md ("The backend"), which this project follows where public implementations
disagree.  Anything not from the specification text is marked as ours in a comment.

Status values are ``(SCT << 8) | SC``, the same packing Linux uses for ``NVME_SC_*``, so one
integer names both the status code type and the status code.
"""

from __future__ import annotations

from enum import IntEnum

LBA_BYTES = 4096
SQE_BYTES = 64
CQE_BYTES = 16
IDENTIFY_BYTES = 4096
CDQ_ENTRY_BYTES = 32  # User Data Migration Queue entry
# Get Features FID 21h data (libnvme struct nvme_lm_ctrl_data_queue_fid_data): le32 head pointer
# (HP), le32 tail pointer trigger (TPT).
CDQ_FEATURE_DATA_BYTES = 8
# Set Features FID 21h CDW11 bit 31: Enable Tail Pointer Trigger (ETPT), the trigger in CDW13.
CDQ_ETPT = 1 << 31
BROADCAST_NSID = 0xFFFF_FFFF


class AdminOpcode(IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    TRACK_SEND = 0x3D
    TRACK_RECEIVE = 0x3E
    MIGRATION_SEND = 0x41
    MIGRATION_RECEIVE = 0x42
    CONTROLLER_DATA_QUEUE = 0x45


# The TP4159 commands: privileged actions of a migration controller on a migratable one.
MIGRATION_OPCODES: frozenset[int] = frozenset({
    AdminOpcode.TRACK_SEND,
    AdminOpcode.TRACK_RECEIVE,
    AdminOpcode.MIGRATION_SEND,
    AdminOpcode.MIGRATION_RECEIVE,
    AdminOpcode.CONTROLLER_DATA_QUEUE,
})


class IoOpcode(IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


class StatusCodeType(IntEnum):
    GENERIC = 0x0
    COMMAND_SPECIFIC = 0x1
    MEDIA_AND_DATA_INTEGRITY = 0x2
    PATH_RELATED = 0x3
    VENDOR_SPECIFIC = 0x7


class Status(IntEnum):
    """Completion status as ``(SCT << 8) | SC`` (Base Specification 2.2, Figures 102 and 103)."""

    # Generic command status (SCT 0).
    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    DATA_TRANSFER_ERROR = 0x004
    INTERNAL_ERROR = 0x006
    INVALID_NAMESPACE_OR_FORMAT = 0x00B
    COMMAND_SEQUENCE_ERROR = 0x00C
    PRP_OFFSET_INVALID = 0x013
    LBA_OUT_OF_RANGE = 0x080
    NAMESPACE_NOT_READY = 0x082
    # Command specific status (SCT 1).
    COMPLETION_QUEUE_INVALID = 0x100
    INVALID_QUEUE_IDENTIFIER = 0x101
    INVALID_QUEUE_SIZE = 0x102
    INVALID_INTERRUPT_VECTOR = 0x108
    INVALID_LOG_PAGE = 0x109
    INVALID_QUEUE_DELETION = 0x10C
    FEATURE_NOT_SAVEABLE = 0x10D
    INVALID_CONTROLLER_IDENTIFIER = 0x11F
    # 37h..3Bh are the TP4159 additions.  Figure 103 of the 2.2 Base Specification lists them as
    # command specific; the vfio-nvme RFC (Aug 2025) adds them to include/linux/nvme.h without
    # the command-specific SCT.  We follow the specification.
    INVALID_CONTROLLER_DATA_QUEUE = 0x137
    NOT_ENOUGH_RESOURCES = 0x138
    CONTROLLER_SUSPENDED = 0x139
    CONTROLLER_NOT_SUSPENDED = 0x13A
    CONTROLLER_DATA_QUEUE_FULL = 0x13B

    @property
    def sct(self) -> int:
        return self.value >> 8

    @property
    def sc(self) -> int:
        return self.value & 0xFF


def status_name(sct: int, sc: int) -> str:
    """``INVALID_FIELD`` for a known status, ``SCT 0x1 / SC 0x42`` otherwise (for messages)."""
    try:
        return Status((sct << 8) | sc).name
    except ValueError:
        return f"SCT {sct:#x} / SC {sc:#04x}"


class FeatureId(IntEnum):
    ARBITRATION = 0x01
    TEMPERATURE_THRESHOLD = 0x04
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    CONTROLLER_DATA_QUEUE = 0x21  # TP4159: head pointer and tail pointer trigger of a Controller Data Queue


class FeatureSelect(IntEnum):
    """Get Features SEL (CDW10 bits 10:8)."""

    CURRENT = 0
    DEFAULT = 1
    SAVED = 2
    SUPPORTED_CAPABILITIES = 3


# Get Features SEL=3 answer bits.
FEATURE_CAP_SAVEABLE = 1 << 0
FEATURE_CAP_NAMESPACE_SPECIFIC = 1 << 1
FEATURE_CAP_CHANGEABLE = 1 << 2


class Cns(IntEnum):
    """Identify Controller or Namespace Structure values (CDW10 bits 7:0)."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACES = 0x02
    SUPPORTED_CONTROLLER_STATE_FORMATS = 0x20  # TP4159


class LogPageId(IntEnum):
    ERROR_INFORMATION = 0x01
    SMART_HEALTH = 0x02
    # Ours, in the vendor-specific range C0h..FFh: the text of the newest error, named by the
    # Vendor Specific Information Available field of its Error Information entry.
    ERROR_DETAIL = 0xC0


class TrackSendSelect(IntEnum):
    LOG_USER_DATA_CHANGES = 0x0
    TRACK_MEMORY_CHANGES = 0x1  # host memory tracking: not supported by the model


class LoggingAction(IntEnum):
    """Track Send LACT (MOS bits 3:0)."""

    STOP = 0x0
    START = 0x1


class MigrationSendSelect(IntEnum):
    SUSPEND = 0x0
    RESUME = 0x1
    SET_CONTROLLER_STATE = 0x2


class MigrationReceiveSelect(IntEnum):
    GET_CONTROLLER_STATE = 0x0


class SuspendType(IntEnum):
    """Suspend STYPE (CDW11 bits 23:16)."""

    NOTIFICATION = 0x0
    SUSPEND = 0x1


class SequenceIndicator(IntEnum):
    """Set Controller State SEQIND (MOS bits 1:0): where this piece sits in the sequence."""

    MIDDLE = 0x0
    FIRST = 0x1
    LAST = 0x2
    ENTIRE = 0x3


class CdqSelect(IntEnum):
    CREATE = 0x0
    DELETE = 0x1


class CdqQueueType(IntEnum):
    USER_DATA_MIGRATION = 0x0


# Identify Controller bits.
OACS_HMLMS = 1 << 11  # Host Managed Live Migration Support
TRATTR_TUDCS = 1 << 1  # Track User Data Changes Support
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
# CMIC (Controller Multi-Path I/O and Namespace Sharing Capabilities, Figure 312; libnvme
# NVME_CTRL_CMIC_*): bit 0 multiple ports, bit 1 multiple controllers, bit 2 SR-IOV virtual
# function, bit 3 ANA reporting.
CMIC_MULTIPLE_PORTS = 1 << 0
CMIC_MULTIPLE_CONTROLLERS = 1 << 1
CMIC_SRIOV_VF = 1 << 2
CMIC_ANA_REPORTING = 1 << 3

# Identify Controller byte offsets (Base Specification 2.1, Figure 312).
ID_CTRL_VID = 0
ID_CTRL_SSVID = 2
ID_CTRL_SN = 4  # 20 ASCII bytes
ID_CTRL_MN = 24  # 40 ASCII bytes
ID_CTRL_FR = 64  # 8 ASCII bytes
ID_CTRL_CMIC = 76
ID_CTRL_MDTS = 77
ID_CTRL_CNTLID = 78
ID_CTRL_VER = 80
ID_CTRL_CNTRLTYPE = 111
ID_CTRL_OACS = 256
ID_CTRL_ACL = 258
ID_CTRL_AERL = 259
ID_CTRL_FRMW = 260
ID_CTRL_ELPE = 262
ID_CTRL_WCTEMP = 266
ID_CTRL_CCTEMP = 268
ID_CTRL_SQES = 512
ID_CTRL_CQES = 513
ID_CTRL_MAXCMD = 514
ID_CTRL_NN = 516
ID_CTRL_ONCS = 520
ID_CTRL_VWC = 525
ID_CTRL_SGLS = 536
ID_CTRL_TRATTR = 576
ID_CTRL_MCUDMQ = 578
ID_CTRL_MNSUDMQ = 580
ID_CTRL_SUBNQN = 768  # 256 bytes

# Identify Namespace byte offsets (NVM Command Set Specification 1.1, Figure 97).
ID_NS_NSZE = 0
ID_NS_NCAP = 8
ID_NS_NUSE = 16
ID_NS_NSFEAT = 24
ID_NS_NLBAF = 25
ID_NS_FLBAS = 26
ID_NS_DLFEAT = 33
ID_NS_LBAF0 = 128
NSFEAT_THIN_PROVISIONING = 1 << 0
# DLFEAT: bits 2:0 = 001b "a deallocated block reads as zeros"; bit 3: Write Zeroes may deallocate.
DLFEAT_READS_ZEROES_AND_WZ_DEALLOCATES = 0x09

# SMART / Health Information log (LID 02h) byte offsets (Base Specification 2.1, Figure 207).
SMART_BYTES = 512
SMART_CRITICAL_WARNING = 0
SMART_COMPOSITE_TEMPERATURE = 1  # u16, kelvin
SMART_AVAILABLE_SPARE = 3
SMART_AVAILABLE_SPARE_THRESHOLD = 4
SMART_PERCENTAGE_USED = 5
SMART_DATA_UNITS_READ = 32  # u128, thousands of 512-byte units, rounded up
SMART_DATA_UNITS_WRITTEN = 48
SMART_HOST_READ_COMMANDS = 64
SMART_HOST_WRITE_COMMANDS = 80
SMART_POWER_CYCLES = 112
SMART_MEDIA_ERRORS = 160
SMART_ERROR_LOG_ENTRIES = 176
# Critical Warning bits.
CRITICAL_WARNING_SPARE = 1 << 0
CRITICAL_WARNING_TEMPERATURE = 1 << 1
CRITICAL_WARNING_RELIABILITY = 1 << 2
CRITICAL_WARNING_READ_ONLY = 1 << 3

ERROR_LOG_ENTRY_BYTES = 64

# I/O command fields.
RW_FUA = 1 << 30  # CDW12, Read/Write/Write Zeroes: Force Unit Access
WRITE_ZEROES_DEAC = 1 << 25  # CDW12: deallocate
DSM_ATTRIBUTE_DEALLOCATE = 1 << 2  # CDW11 AD
DSM_RANGE_BYTES = 16
