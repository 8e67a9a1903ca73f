"""Builds and runs the inference service: storage, the model holder, the batcher, the stage, health."""

from __future__ import annotations

import asyncio
from importlib import metadata

from inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from mt5.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.common import db
from services.common.channels import open_channel
from services.common.server import ServiceHost, run_with_database
from services.inference.config import SERVICE_NAME, InferenceConfig
from services.inference.oip import OpenInferenceServicer
from services.inference.registry import ModelRegistry
from services.inference.servicer import InferenceServicer
from services.inference.serving import MicroBatcher, ModelHolder
from services.inference.stage import InferenceStage
from services.inference.store import SignalStore


async def serve(config: InferenceConfig, host: ServiceHost | None = None) -> None:
    """Run until SIGTERM (or ``host.request_stop()``).

    The server's health ("") is SERVING while the database answers, so the gateway can route the
    signal routes, which answer 503 "no model" until a model is trained; the health of
    ``mt5.inference.v1.InferenceService`` is SERVING only while a verified model is loaded.
    """
    engine = db.create_db_engine(config.runtime.database_url)
    indicators = open_channel(
        config.indicators_address,
        config.runtime.api_keys[0],
        tracing=bool(config.runtime.otlp_endpoint),
        max_message_bytes=config.runtime.max_message_bytes,
        unary_deadline=30.0,
    )
    holder = ModelHolder(ModelRegistry(config.models_dir), config.model_name)
    batcher = MicroBatcher(holder, config.max_batch, config.max_wait_seconds, config.max_queue)
    store = SignalStore(engine)
    stage = InferenceStage(config, store, indicators, holder, batcher)
    oip_name = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    host = host or ServiceHost(config.runtime, SERVICE_NAME, also_served=[oip_name])
    pb_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(stage, store, holder, batcher, config.max_subscribers), host.server
    )
    # KServe's Open Inference Protocol v2, so standard model-serving clients work too.
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        OpenInferenceServicer(holder, batcher, metadata.version("mt5-mesh"), lambda: host.serving),
        host.server,
    )

    async def prepare() -> None:
        await stage.restore()
        model = await asyncio.to_thread(holder.find)
        if model is not None:
            holder.install(model)

    async def work() -> None:
        await asyncio.gather(holder.watch(config.reload_seconds), batcher.run(), stage.run())

    await run_with_database(
        host,
        engine,
        work,
        prepare=prepare,
        close=indicators.close,
        service_ready=lambda: holder.current is not None,
    )
