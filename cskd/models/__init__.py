"""Teacher and student models, and head fusion for deployment."""

from cskd.models import zoo  # noqa: F401  (registers the demo architectures with timm)
from cskd.models.deploy import DeployModule
from cskd.models.fusion import FusedStudent, fuse_heads
from cskd.models.student import HEADS, DistilledStudent, StudentOutput, create_student
from cskd.models.teacher import DenseTeacher, create_teacher

__all__ = [
    "HEADS",
    "DeployModule",
    "DenseTeacher",
    "DistilledStudent",
    "FusedStudent",
    "StudentOutput",
    "create_student",
    "create_teacher",
    "fuse_heads",
]
