#!/bin/sh
# Regenerate the Python stubs of the kubelet device plugin API (flexnpu/k8s/api_pb2*.py) from
# flexnpu/k8s/api.proto. Needs grpcio-tools (pip install grpcio-tools); run from the repository
# root. The stubs are checked in, so installing FlexNPU needs only grpcio and protobuf.
set -eu
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. flexnpu/k8s/api.proto
