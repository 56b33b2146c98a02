"""A local look-alike of AWS IoT Core + AWS IoT Jobs + S3 presigned URLs + the Greengrass v1
control plane, made of real parts (mosquitto with mutual TLS, an HTTPS server), for the tests
and the demo. Nothing here is the agent."""
from .cloud import Cloud
from .device import DeviceRoot, build_agent_artifact, build_core_artifact, make_root
from .jobs import JobsError, JobsService
from .pki import Pki

__all__ = ["Cloud", "DeviceRoot", "JobsError", "JobsService", "Pki", "build_agent_artifact",
           "build_core_artifact", "make_root"]
