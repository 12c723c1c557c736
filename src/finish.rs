//! Work that must run to its end once begun, even when the request that began it is dropped
//! (a sender that hangs up, an HTTP/2 stream reset): the rest of it is then finished by a
//! task of its own.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A future awaited in place which, dropped before it is done, is finished by a task of its
/// own on the current runtime.
pub struct Finish<F: Future + Send + 'static>(Option<Pin<Box<F>>>)
where
    F::Output: Send + 'static;

impl<F: Future + Send + 'static> Finish<F>
where
    F::Output: Send + 'static,
{
    pub fn new(future: F) -> Self {
        Finish(Some(Box::pin(future)))
    }
}

impl<F: Future + Send + 'static> Future for Finish<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(future) = self.0.as_mut() else {
            return Poll::Pending;
        };
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for Finish<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(future) = self.0.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(future);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_dropped_future_is_finished_by_a_task() {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let work = Finish::new(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            flag.store(true, Ordering::SeqCst);
        });
        // Polled once, then dropped, as hyper drops a handler whose client went away.
        let _ = tokio::time::timeout(Duration::from_millis(1), work).await;
        assert!(!done.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(done.load(Ordering::SeqCst));
    }
}
