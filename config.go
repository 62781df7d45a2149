package main

// config.go reads the configuration: every variable the service takes from
// its environment, its default, and the names of the Kafka contract.

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// KAFKA_GROUP_PROTOCOL's values, named as Kafka's group.protocol names them.
const (
	groupProtocolConsumer = "consumer" // KIP-848, Kafka 4.0 and later
	groupProtocolClassic  = "classic"
)

// defaultHTTPAddr is loopback: the service trusts X-User-Id, so `go run .`
// on a laptop must not serve the network. Images and compose set ":8081".
const defaultHTTPAddr = "127.0.0.1:8081"

// Topic names of the Kafka contract and the consumer group (before
// KAFKA_TOPIC_PREFIX).
const (
	topicPayOrder       = "pay-order"
	topicPaymentResults = "payment-results"
	topicPaymentDLQ     = "payment-results.dlq"
	consumerGroup       = "order-service"
)

type config struct {
	HTTPAddr          string
	DatabaseURL       string
	KafkaBrokers      []string
	EmbeddedKafkaAddr string
	EmbeddedKafkaDir  string
	DemoPayments      bool
	TopicPrefix       string
	TopicPartitions   int32
	StartupTimeout    time.Duration
	ShutdownTimeout   time.Duration
	RelayBatchSize    int
	RelayWorkers      int
	RelayPollInterval time.Duration
	ProduceTimeout    time.Duration
	SessionTimeout    time.Duration
	RebalanceTimeout  time.Duration
	InstanceID        string
	GroupProtocol     string
	CreateBatchMax    int
	CreateWriters     int
	CreateQueueMax    int
	PprofAddr         string
	StreamsMax        int
	StreamsPerUser    int
	StreamLifetime    time.Duration
	LogLevel          slog.Level
	LogJSON           bool
}

func (c config) topic(name string) string { return c.TopicPrefix + name }

// loadConfig reads the environment; every variable has a default that makes
// `go run .` work on a developer machine. Every malformed variable is named
// in one error.
func loadConfig(getenv func(string) string) (config, error) {
	e := &env{getenv: getenv}
	c := config{
		HTTPAddr:          e.str("HTTP_ADDR", defaultHTTPAddr),
		DatabaseURL:       e.str("DATABASE_URL", ""),
		KafkaBrokers:      e.list("KAFKA_BROKERS"),
		EmbeddedKafkaAddr: e.str("EMBEDDED_KAFKA_ADDR", "127.0.0.1:9092"),
		EmbeddedKafkaDir:  e.str("EMBEDDED_KAFKA_DIR", defaultKafkaDir()),
		TopicPrefix:       e.str("KAFKA_TOPIC_PREFIX", ""),
		TopicPartitions:   int32(e.num("KAFKA_TOPIC_PARTITIONS", 3, 1, 1000)),
		StartupTimeout:    e.dur("STARTUP_TIMEOUT", 30*time.Second),
		ShutdownTimeout:   e.dur("SHUTDOWN_TIMEOUT", 10*time.Second),
		RelayBatchSize:    e.num("RELAY_BATCH_SIZE", 500, 1, 10000),
		RelayWorkers:      e.num("RELAY_WORKERS", 2, 1, 16),
		RelayPollInterval: e.dur("RELAY_POLL_INTERVAL", time.Second),
		ProduceTimeout:    e.dur("RELAY_PRODUCE_TIMEOUT", 10*time.Second),
		SessionTimeout:    e.dur("KAFKA_SESSION_TIMEOUT", 10*time.Second),
		RebalanceTimeout:  e.dur("KAFKA_REBALANCE_TIMEOUT", 60*time.Second),
		InstanceID:        e.str("KAFKA_GROUP_INSTANCE_ID", ""),
		GroupProtocol:     e.oneOf("KAFKA_GROUP_PROTOCOL", groupProtocolConsumer, groupProtocolClassic),
		CreateBatchMax:    e.num("CREATE_BATCH_MAX", 64, 1, 1000),
		CreateWriters:     e.num("CREATE_WRITERS", 2, 1, 64),
		CreateQueueMax:    e.num("CREATE_QUEUE_MAX", 512, 1, 100_000),
		PprofAddr:         e.str("PPROF_ADDR", ""),
		StreamsMax:        e.num("STREAMS_MAX", 1000, 1, 1_000_000),
		StreamsPerUser:    e.num("STREAMS_PER_USER", 10, 1, 10_000),
		StreamLifetime:    e.dur("STREAM_MAX_LIFETIME", 5*time.Minute),
		LogJSON:           e.oneOf("LOG_FORMAT", "text", "json") == "json",
	}
	// The demo Payment Service answers by default only where nobody else
	// can: on the embedded broker.
	c.DemoPayments = e.boolean("DEMO_PAYMENTS", len(c.KafkaBrokers) == 0)
	if err := c.LogLevel.UnmarshalText([]byte(e.str("LOG_LEVEL", "info"))); err != nil {
		e.errs = append(e.errs, fmt.Errorf("LOG_LEVEL: %w", err))
	}
	if err := errors.Join(e.errs...); err != nil {
		return c, fmt.Errorf("configuration: %w", err)
	}
	return c, nil
}

// env reads configuration variables and collects what is wrong with them.
type env struct {
	getenv func(string) string
	errs   []error
}

func (e *env) str(key, def string) string {
	if v := strings.TrimSpace(e.getenv(key)); v != "" {
		return v
	}
	return def
}

// list is a comma-separated list, empty items dropped.
func (e *env) list(key string) []string {
	var items []string
	for _, v := range strings.Split(e.str(key, ""), ",") {
		if v = strings.TrimSpace(v); v != "" {
			items = append(items, v)
		}
	}
	return items
}

func (e *env) dur(key string, def time.Duration) time.Duration {
	v := e.str(key, "")
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		e.errs = append(e.errs, fmt.Errorf("%s=%q: want a positive duration such as 1s or 500ms", key, v))
	}
	return d
}

func (e *env) num(key string, def, lo, hi int) int {
	v := e.str(key, "")
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < lo || n > hi {
		e.errs = append(e.errs, fmt.Errorf("%s=%q: want an integer from %d to %d", key, v, lo, hi))
	}
	return n
}

// oneOf is one of the given words, in any case; the first is the default.
func (e *env) oneOf(key string, words ...string) string {
	v := strings.ToLower(e.str(key, words[0]))
	if !slices.Contains(words, v) {
		e.errs = append(e.errs, fmt.Errorf("%s=%q: want %s", key, v, strings.Join(words, " or ")))
	}
	return v
}

func (e *env) boolean(key string, def bool) bool {
	switch v := strings.ToLower(e.str(key, "")); v {
	case "":
		return def
	case "true", "1", "yes":
		return true
	case "false", "0", "no":
		return false
	default:
		e.errs = append(e.errs, fmt.Errorf("%s=%q: want true or false", key, v))
		return def
	}
}

// defaultKafkaDir keeps the embedded broker's log in the user's cache.
func defaultKafkaDir() string {
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	return filepath.Join(cache, "order-service", "kafka")
}
