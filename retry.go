package main

// retry.go is how the service waits out a fault it expects to pass (the
// database or the broker away for a while): one retry loop, with capped
// exponential backoff and jitter, for every place that retries.

import (
	"context"
	"math/rand/v2"
	"time"
)

// maxBackoff caps the wait between two tries.
const maxBackoff = 5 * time.Second

// retry runs try until it succeeds, until failed says to stop, or until ctx
// ends, and returns try's last error. After each failure it calls
// failed(err, wait) with the backoff it is about to wait, for the caller to
// log the failure or to give up on it (false: an error no retry can cure).
func retry(ctx context.Context, try func(context.Context) error, failed func(err error, wait time.Duration) bool) error {
	for failures := 1; ; failures++ {
		err := try(ctx)
		if err == nil || ctx.Err() != nil {
			return err
		}
		wait := backoff(failures)
		if !failed(err, wait) {
			return err
		}
		sleep(ctx, wait)
		if ctx.Err() != nil {
			return err
		}
	}
}

// backoff is capped exponential backoff with jitter: 100ms, 200ms, ... 5s.
func backoff(failures int) time.Duration {
	d := maxBackoff
	if failures < 7 {
		d = min(maxBackoff, 100*time.Millisecond<<(failures-1))
	}
	return jitter(d)
}

// jitter adds up to 10% so that replicas do not poll in lockstep.
func jitter(d time.Duration) time.Duration {
	return d + rand.N(d/10+1)
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
