//! A value that a long-lived object either borrows or co-owns.

use std::ops::Deref;
use std::sync::Arc;

/// A trainer borrows its model where the caller's scope outlives it (a CLI run), and co-owns it where
/// there is no such scope (a browser session lives as long as the page keeps it, so it owns its model and
/// GPU rather than leaking them for a `'static` borrow).
pub enum Shared<'a, T> {
    Borrowed(&'a T),
    Owned(Arc<T>),
}

impl<T> Deref for Shared<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        match self {
            Shared::Borrowed(t) => t,
            Shared::Owned(t) => t,
        }
    }
}

impl<T> Clone for Shared<'_, T> {
    fn clone(&self) -> Self {
        match self {
            Shared::Borrowed(t) => Shared::Borrowed(t),
            Shared::Owned(t) => Shared::Owned(t.clone()),
        }
    }
}

impl<'a, T> From<&'a T> for Shared<'a, T> {
    fn from(t: &'a T) -> Self {
        Shared::Borrowed(t)
    }
}

impl<T> From<Arc<T>> for Shared<'_, T> {
    fn from(t: Arc<T>) -> Self {
        Shared::Owned(t)
    }
}
