//! One message per key at a time, for a sink that cannot keep a key's order through a partial
//! refusal (RabbitMQ refusing one message while it accepts the next): later messages of a key wait
//! here until the one before them is acknowledged or dead-lettered.

use std::collections::{HashMap, VecDeque};

use super::window::Entry;

#[derive(Default)]
pub struct KeyQueues {
    /// A key is present while one of its messages is in flight (or failed, waiting for a retry);
    /// its queue holds the later ones.
    waiting: HashMap<String, VecDeque<Entry>>,
    count: usize,
}

impl KeyQueues {
    /// The entry back when it may be sent now; kept (and `None`) when an earlier message of its
    /// key is still unsettled. Messages without a key have no order to keep.
    pub fn admit(&mut self, entry: Entry) -> Option<Entry> {
        let Some(key) = entry.message.key.as_deref() else {
            return Some(entry);
        };
        match self.waiting.get_mut(key) {
            Some(queue) => {
                queue.push_back(entry);
                self.count += 1;
                None
            }
            None => {
                self.waiting.insert(key.to_owned(), VecDeque::new());
                Some(entry)
            }
        }
    }

    /// The message of `key` in flight has settled: the next one of that key, if any.
    pub fn settled(&mut self, key: Option<&str>) -> Option<Entry> {
        let key = key?;
        let queue = self.waiting.get_mut(key)?;
        match queue.pop_front() {
            Some(next) => {
                self.count -= 1;
                Some(next)
            }
            None => {
                self.waiting.remove(key);
                None
            }
        }
    }

    /// Messages waiting for an earlier one of their key.
    pub fn len(&self) -> usize {
        self.count
    }
}
