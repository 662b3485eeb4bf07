"""Server reflection under both names clients ask for: ``grpc.reflection.v1`` and ``v1alpha``.

grpcio-reflection (1.85) serves only ``grpc.reflection.v1alpha.ServerReflection``; newer tools
(grpcurl >= 1.9, Postman, grpc-js' reflection client) ask ``grpc.reflection.v1`` first. The two
protos are the same messages with the same field numbers under another package, so one servicer
answers both: the v1 method decodes and encodes with the v1alpha classes (byte-identical on the
wire), and the v1 file descriptor is added to the pool, so reflection can describe itself under
either name (``grpcurl describe grpc.reflection.v1.ServerReflection``).

This module only registers services; it never changes what they answer.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"


def v1_file_descriptor(pool: descriptor_pool.DescriptorPool | None = None) -> FileDescriptor:
    """``grpc/reflection/v1/reflection.proto``, derived from the v1alpha file (added to ``pool`` once)."""
    pool = pool or descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE_NAME)
    except KeyError:
        pass
    old_prefix, new_prefix = f".{reflection_pb2.DESCRIPTOR.package}.", f".{V1_PACKAGE}."
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = V1_FILE_NAME, V1_PACKAGE
    proto.ClearField("options")  # java/go package names of v1alpha
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(old_prefix):
                f.type_name = new_prefix + f.type_name[len(old_prefix):]
    for service in proto.service:
        for method in service.method:
            method.input_type = new_prefix + method.input_type[len(old_prefix):]
            method.output_type = new_prefix + method.output_type[len(old_prefix):]
    return pool.AddSerializedFile(proto.SerializeToString())


def reflection_services() -> tuple[ServiceDescriptor, ServiceDescriptor]:
    """The descriptors of ``grpc.reflection.v1.ServerReflection`` and its v1alpha twin."""
    return (v1_file_descriptor().services_by_name["ServerReflection"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection (v1 and v1alpha) for ``service_names`` plus the reflection services themselves."""
    v1_file_descriptor()
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE_NAME,
                                                                          {"ServerReflectionInfo": v1}),))
