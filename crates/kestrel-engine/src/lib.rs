//! Generation: sampling, stop conditions, the single-sequence `Session`
//! used by `run` and `chat`, and the batching `Engine` (scheduler, paged KV
//! block manager with prefix caching, engine loop on its own thread).

pub mod block_manager;
pub mod engine;
pub mod error;
pub mod events;
pub mod output;
pub mod perplexity;
pub mod sampling;
pub mod scheduler;
pub mod session;
pub mod speculative;
pub mod stop;
#[cfg(feature = "test-util")]
pub mod test_util;

pub use engine::{Engine, EngineConfig, EngineHandle, EngineStats, RequestOptions};
pub use error::EngineError;
pub use events::{Event, EventReceiver, FinishReason, PromptLogprob, RequestId, Usage};
pub use perplexity::{perplexity, Perplexity};
pub use sampling::{Sampled, Sampler, SamplingError, SamplingParams};
pub use scheduler::LongPrefill;
pub use session::{Generation, Session, BLOCK_SIZE};
pub use speculative::NgramSpeculation;
pub use stop::{StopMatcher, StopOutput};
