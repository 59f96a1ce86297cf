import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    PENDING: _ClassVar[SessionState]
    QUEUED: _ClassVar[SessionState]
    LOADING: _ClassVar[SessionState]
    COMPILING: _ClassVar[SessionState]
    RUNNING: _ClassVar[SessionState]
    PAUSED: _ClassVar[SessionState]
    SUSPENDED: _ClassVar[SessionState]
    COMPLETED: _ClassVar[SessionState]
    STOPPED: _ClassVar[SessionState]
    EARLY_STOPPED: _ClassVar[SessionState]
    FAILED: _ClassVar[SessionState]
    INTERRUPTED: _ClassVar[SessionState]
SESSION_STATE_UNSPECIFIED: SessionState
PENDING: SessionState
QUEUED: SessionState
LOADING: SessionState
COMPILING: SessionState
RUNNING: SessionState
PAUSED: SessionState
SUSPENDED: SessionState
COMPLETED: SessionState
STOPPED: SessionState
EARLY_STOPPED: SessionState
FAILED: SessionState
INTERRUPTED: SessionState

class Hyperparameters(_message.Message):
    __slots__ = ("optimizer", "learning_rate", "batch_size", "epochs", "seed", "model", "monitor", "early_stopping_patience", "keep_best", "keep_latest", "statistics_every_steps")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    KEEP_BEST_FIELD_NUMBER: _ClassVar[int]
    KEEP_LATEST_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    learning_rate: float
    batch_size: int
    epochs: int
    seed: int
    model: _struct_pb2.Struct
    monitor: str
    early_stopping_patience: int
    keep_best: int
    keep_latest: int
    statistics_every_steps: int
    def __init__(self, optimizer: _Optional[str] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., epochs: _Optional[int] = ..., seed: _Optional[int] = ..., model: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., monitor: _Optional[str] = ..., early_stopping_patience: _Optional[int] = ..., keep_best: _Optional[int] = ..., keep_latest: _Optional[int] = ..., statistics_every_steps: _Optional[int] = ...) -> None: ...

class StartSessionRequest(_message.Message):
    __slots__ = ("model", "dataset", "hyperparameters", "train_inputs", "train_targets", "val_inputs", "val_targets", "init_parameter_set", "description", "device", "resume_from")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TARGETS_FIELD_NUMBER: _ClassVar[int]
    VAL_INPUTS_FIELD_NUMBER: _ClassVar[int]
    VAL_TARGETS_FIELD_NUMBER: _ClassVar[int]
    INIT_PARAMETER_SET_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    model: str
    dataset: str
    hyperparameters: Hyperparameters
    train_inputs: str
    train_targets: str
    val_inputs: str
    val_targets: str
    init_parameter_set: str
    description: str
    device: str
    resume_from: str
    def __init__(self, model: _Optional[str] = ..., dataset: _Optional[str] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., train_inputs: _Optional[str] = ..., train_targets: _Optional[str] = ..., val_inputs: _Optional[str] = ..., val_targets: _Optional[str] = ..., init_parameter_set: _Optional[str] = ..., description: _Optional[str] = ..., device: _Optional[str] = ..., resume_from: _Optional[str] = ...) -> None: ...

class EpochMetrics(_message.Message):
    __slots__ = ("epoch", "step", "train_loss", "val_loss", "metrics", "parameter_set_id", "epoch_seconds", "examples_per_second")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SET_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    step: int
    train_loss: float
    val_loss: float
    metrics: _containers.ScalarMap[str, float]
    parameter_set_id: str
    epoch_seconds: float
    examples_per_second: float
    def __init__(self, epoch: _Optional[int] = ..., step: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., parameter_set_id: _Optional[str] = ..., epoch_seconds: _Optional[float] = ..., examples_per_second: _Optional[float] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("id", "model", "model_version", "dataset", "dataset_version", "hyperparameters", "state", "device", "backend", "created_at", "started_at", "finished_at", "error", "epochs", "best_parameter_set_id", "last_parameter_set_id", "epoch", "step", "steps_per_epoch", "description", "pid", "compile_seconds", "history", "resumed_from", "estimated_bytes", "queue_position", "train_inputs", "train_targets", "val_inputs", "val_targets")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATASET_VERSION_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BEST_PARAMETER_SET_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_PARAMETER_SET_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TARGETS_FIELD_NUMBER: _ClassVar[int]
    VAL_INPUTS_FIELD_NUMBER: _ClassVar[int]
    VAL_TARGETS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    model_version: int
    dataset: str
    dataset_version: int
    hyperparameters: Hyperparameters
    state: SessionState
    device: str
    backend: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    error: str
    epochs: _containers.RepeatedCompositeFieldContainer[EpochMetrics]
    best_parameter_set_id: str
    last_parameter_set_id: str
    epoch: int
    step: int
    steps_per_epoch: int
    description: str
    pid: int
    compile_seconds: float
    history: _containers.RepeatedCompositeFieldContainer[HyperparameterChange]
    resumed_from: str
    estimated_bytes: int
    queue_position: int
    train_inputs: str
    train_targets: str
    val_inputs: str
    val_targets: str
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., dataset: _Optional[str] = ..., dataset_version: _Optional[int] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., state: _Optional[_Union[SessionState, str]] = ..., device: _Optional[str] = ..., backend: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., epochs: _Optional[_Iterable[_Union[EpochMetrics, _Mapping]]] = ..., best_parameter_set_id: _Optional[str] = ..., last_parameter_set_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ..., description: _Optional[str] = ..., pid: _Optional[int] = ..., compile_seconds: _Optional[float] = ..., history: _Optional[_Iterable[_Union[HyperparameterChange, _Mapping]]] = ..., resumed_from: _Optional[str] = ..., estimated_bytes: _Optional[int] = ..., queue_position: _Optional[int] = ..., train_inputs: _Optional[str] = ..., train_targets: _Optional[str] = ..., val_inputs: _Optional[str] = ..., val_targets: _Optional[str] = ...) -> None: ...

class HyperparameterChange(_message.Message):
    __slots__ = ("changed_at", "step", "name", "old_value", "new_value")
    CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OLD_VALUE_FIELD_NUMBER: _ClassVar[int]
    NEW_VALUE_FIELD_NUMBER: _ClassVar[int]
    changed_at: _timestamp_pb2.Timestamp
    step: int
    name: str
    old_value: float
    new_value: float
    def __init__(self, changed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., step: _Optional[int] = ..., name: _Optional[str] = ..., old_value: _Optional[float] = ..., new_value: _Optional[float] = ...) -> None: ...

class PauseSessionRequest(_message.Message):
    __slots__ = ("id", "release")
    ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    id: str
    release: bool
    def __init__(self, id: _Optional[str] = ..., release: _Optional[bool] = ...) -> None: ...

class ResumeSessionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CheckpointSessionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CheckpointSessionResponse(_message.Message):
    __slots__ = ("parameter_set_id",)
    PARAMETER_SET_ID_FIELD_NUMBER: _ClassVar[int]
    parameter_set_id: str
    def __init__(self, parameter_set_id: _Optional[str] = ...) -> None: ...

class UpdateHyperparametersRequest(_message.Message):
    __slots__ = ("id", "learning_rate")
    ID_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    learning_rate: float
    def __init__(self, id: _Optional[str] = ..., learning_rate: _Optional[float] = ...) -> None: ...

class GetDevicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Device(_message.Message):
    __slots__ = ("name", "kind", "memory_budget_bytes", "memory_used_bytes", "session_ids", "backend")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    memory_budget_bytes: int
    memory_used_bytes: int
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    backend: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., session_ids: _Optional[_Iterable[str]] = ..., backend: _Optional[str] = ...) -> None: ...

class GetDevicesResponse(_message.Message):
    __slots__ = ("devices", "queued_session_ids")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    queued_session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., queued_session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchMetricsRequest(_message.Message):
    __slots__ = ("session_ids",)
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class MetricPoint(_message.Message):
    __slots__ = ("session_id", "name", "value", "epoch", "step", "time")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    value: float
    epoch: int
    step: int
    time: _timestamp_pb2.Timestamp
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[float] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ParameterStatistic(_message.Message):
    __slots__ = ("name", "layer", "l2_norm", "mean", "std", "gradient_l2_norm", "update_ratio")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    L2_NORM_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_L2_NORM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_RATIO_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: str
    l2_norm: float
    mean: float
    std: float
    gradient_l2_norm: float
    update_ratio: float
    def __init__(self, name: _Optional[str] = ..., layer: _Optional[str] = ..., l2_norm: _Optional[float] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., gradient_l2_norm: _Optional[float] = ..., update_ratio: _Optional[float] = ...) -> None: ...

class ParameterStatistics(_message.Message):
    __slots__ = ("step", "parameters")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    step: int
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterStatistic]
    def __init__(self, step: _Optional[int] = ..., parameters: _Optional[_Iterable[_Union[ParameterStatistic, _Mapping]]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("states",)
    STATES_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[SessionState]
    def __init__(self, states: _Optional[_Iterable[_Union[SessionState, str]]] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class StopSessionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchSessionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("epoch", "step", "step_in_epoch", "train_loss", "examples_per_second", "learning_rate", "step_seconds")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_IN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    step: int
    step_in_epoch: int
    train_loss: float
    examples_per_second: float
    learning_rate: float
    step_seconds: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, epoch: _Optional[int] = ..., step: _Optional[int] = ..., step_in_epoch: _Optional[int] = ..., train_loss: _Optional[float] = ..., examples_per_second: _Optional[float] = ..., learning_rate: _Optional[float] = ..., step_seconds: _Optional[_Iterable[float]] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("snapshot", "progress", "epoch_end", "state")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_END_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    snapshot: Session
    progress: StepProgress
    epoch_end: EpochMetrics
    state: SessionState
    def __init__(self, snapshot: _Optional[_Union[Session, _Mapping]] = ..., progress: _Optional[_Union[StepProgress, _Mapping]] = ..., epoch_end: _Optional[_Union[EpochMetrics, _Mapping]] = ..., state: _Optional[_Union[SessionState, str]] = ...) -> None: ...

class WorkerHello(_message.Message):
    __slots__ = ("session_id", "token", "pid")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token: str
    pid: int
    def __init__(self, session_id: _Optional[str] = ..., token: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class WorkerStateChange(_message.Message):
    __slots__ = ("state", "error", "compile_seconds", "steps_per_epoch", "backend")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    state: SessionState
    error: str
    compile_seconds: float
    steps_per_epoch: int
    backend: str
    def __init__(self, state: _Optional[_Union[SessionState, str]] = ..., error: _Optional[str] = ..., compile_seconds: _Optional[float] = ..., steps_per_epoch: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class CheckpointSaved(_message.Message):
    __slots__ = ("request_id", "parameter_set_id", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SET_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    parameter_set_id: str
    error: str
    def __init__(self, request_id: _Optional[int] = ..., parameter_set_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class HyperparametersApplied(_message.Message):
    __slots__ = ("request_id", "step", "learning_rate", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    step: int
    learning_rate: float
    error: str
    def __init__(self, request_id: _Optional[int] = ..., step: _Optional[int] = ..., learning_rate: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class WorkerReport(_message.Message):
    __slots__ = ("hello", "state", "progress", "epoch_end", "best_parameter_set_id", "checkpoint_saved", "hyperparameters_applied", "parameter_statistics", "deleted_parameter_set_id")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_END_FIELD_NUMBER: _ClassVar[int]
    BEST_PARAMETER_SET_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SAVED_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    DELETED_PARAMETER_SET_ID_FIELD_NUMBER: _ClassVar[int]
    hello: WorkerHello
    state: WorkerStateChange
    progress: StepProgress
    epoch_end: EpochMetrics
    best_parameter_set_id: str
    checkpoint_saved: CheckpointSaved
    hyperparameters_applied: HyperparametersApplied
    parameter_statistics: ParameterStatistics
    deleted_parameter_set_id: str
    def __init__(self, hello: _Optional[_Union[WorkerHello, _Mapping]] = ..., state: _Optional[_Union[WorkerStateChange, _Mapping]] = ..., progress: _Optional[_Union[StepProgress, _Mapping]] = ..., epoch_end: _Optional[_Union[EpochMetrics, _Mapping]] = ..., best_parameter_set_id: _Optional[str] = ..., checkpoint_saved: _Optional[_Union[CheckpointSaved, _Mapping]] = ..., hyperparameters_applied: _Optional[_Union[HyperparametersApplied, _Mapping]] = ..., parameter_statistics: _Optional[_Union[ParameterStatistics, _Mapping]] = ..., deleted_parameter_set_id: _Optional[str] = ...) -> None: ...

class SessionSpec(_message.Message):
    __slots__ = ("session_id", "model", "model_version", "dataset", "dataset_version", "hyperparameters", "train_inputs", "train_targets", "val_inputs", "val_targets", "init_parameter_set", "registry_address", "data_address", "device", "backend", "first_epoch", "first_step", "saved_parameter_set_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATASET_VERSION_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TARGETS_FIELD_NUMBER: _ClassVar[int]
    VAL_INPUTS_FIELD_NUMBER: _ClassVar[int]
    VAL_TARGETS_FIELD_NUMBER: _ClassVar[int]
    INIT_PARAMETER_SET_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    FIRST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    SAVED_PARAMETER_SET_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    model_version: int
    dataset: str
    dataset_version: int
    hyperparameters: Hyperparameters
    train_inputs: str
    train_targets: str
    val_inputs: str
    val_targets: str
    init_parameter_set: str
    registry_address: str
    data_address: str
    device: str
    backend: str
    first_epoch: int
    first_step: int
    saved_parameter_set_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., dataset: _Optional[str] = ..., dataset_version: _Optional[int] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., train_inputs: _Optional[str] = ..., train_targets: _Optional[str] = ..., val_inputs: _Optional[str] = ..., val_targets: _Optional[str] = ..., init_parameter_set: _Optional[str] = ..., registry_address: _Optional[str] = ..., data_address: _Optional[str] = ..., device: _Optional[str] = ..., backend: _Optional[str] = ..., first_epoch: _Optional[int] = ..., first_step: _Optional[int] = ..., saved_parameter_set_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckpointCommand(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    def __init__(self, request_id: _Optional[int] = ...) -> None: ...

class SetHyperparametersCommand(_message.Message):
    __slots__ = ("request_id", "learning_rate")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    learning_rate: float
    def __init__(self, request_id: _Optional[int] = ..., learning_rate: _Optional[float] = ...) -> None: ...

class WorkerCommand(_message.Message):
    __slots__ = ("start", "stop", "pause", "resume", "checkpoint", "set_hyperparameters", "release")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SET_HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    start: SessionSpec
    stop: bool
    pause: bool
    resume: bool
    checkpoint: CheckpointCommand
    set_hyperparameters: SetHyperparametersCommand
    release: SessionState
    def __init__(self, start: _Optional[_Union[SessionSpec, _Mapping]] = ..., stop: _Optional[bool] = ..., pause: _Optional[bool] = ..., resume: _Optional[bool] = ..., checkpoint: _Optional[_Union[CheckpointCommand, _Mapping]] = ..., set_hyperparameters: _Optional[_Union[SetHyperparametersCommand, _Mapping]] = ..., release: _Optional[_Union[SessionState, str]] = ...) -> None: ...
