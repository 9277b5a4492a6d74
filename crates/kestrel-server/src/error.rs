//! Errors as OpenAI clients expect them: a status code and a JSON body
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kestrel_engine::{EngineError, SamplingError};

/// An error answered to the client. `kind` is the OpenAI `type` field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {kind}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400: malformed JSON, wrong types, out-of-range values, context overflow.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the parameter at fault.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid(message).with_param(param)
    }

    /// 401: missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", message).with_code("invalid_api_key")
    }

    /// 404: unknown model.
    pub fn model_not_found(model: &str, served: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("the model `{model}` does not exist; this server serves `{served}`"),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// 404: unknown route.
    pub fn route_not_found(method: &str, path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("no route for {method} {path}"),
        )
    }

    /// 405: known route, wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{path} does not accept {method}"),
        )
    }

    /// 413: body over the size limit.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is over the limit of {limit} bytes"),
        )
        .with_code("request_too_large")
    }

    /// 503: the bounded queue is full, or the engine has stopped.
    pub fn overloaded(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", message)
            .with_code("server_overloaded")
    }

    /// 500: the engine failed on a valid request.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn with_param(mut self, param: &str) -> ApiError {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The JSON body, also sent as an SSE event when a stream fails midway.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<SamplingError> for ApiError {
    fn from(e: SamplingError) -> ApiError {
        let param = match &e {
            SamplingError::OutOfRange { name, .. } => Some(*name),
            SamplingError::EmptyStop { .. } => Some("stop"),
            SamplingError::EmptyLogits => None,
        };
        let err = ApiError::invalid(e.to_string());
        match param {
            Some(p) => err.with_param(p),
            None => err,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::Sampling(s) => s.into(),
            EngineError::Request(m) => ApiError::invalid(m),
            EngineError::Tokenizer(t) => ApiError::invalid(t.to_string()),
            EngineError::Stopped => {
                ApiError::overloaded("the engine has stopped (the server is shutting down)")
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}
