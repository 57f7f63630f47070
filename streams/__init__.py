"""The wire: topics, record formats and their codecs, the configs stream and the publisher."""
