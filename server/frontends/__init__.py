"""The protocol front ends: OpenAI HTTP, autoglm.v1 gRPC, KServe v2 gRPC, and what they share."""
