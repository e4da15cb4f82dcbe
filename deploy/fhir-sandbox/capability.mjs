// The CapabilityStatement served at /metadata, and the SMART configuration document: both say
// only what this server really does (search parameters it refuses are not listed).
import { SEARCHABLE, searchParametersOf } from './repository.mjs';

const TYPE_INTERACTIONS = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'];

export function capabilityStatement({ baseUrl, resourceTypes, version, tokenUrl, authModes }) {
  const rest = {
    mode: 'server',
    documentation:
      'StrokeWatch FHIR sandbox (Medplum FhirRouter over an in-memory store). ' +
      'String search matches substrings; _include, _revinclude, chaining, _has, and number/quantity/uri ' +
      'search parameters are refused with 400.',
    resource: [...resourceTypes].map((type) => resourceCapability(type)),
    interaction: [{ code: 'transaction' }, { code: 'batch' }],
  };
  if (authModes.length > 0) {
    rest.security = {
      service: authModes.map((mode) => ({
        coding: [{ system: 'http://terminology.hl7.org/CodeSystem/restful-security-service', code: mode }],
      })),
      description: `Requests other than /metadata need an Authorization header (${authModes.join(', ')}).`,
    };
    if (tokenUrl) {
      rest.security.extension = [
        {
          url: 'http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris',
          extension: [{ url: 'token', valueUri: tokenUrl }],
        },
      ];
    }
  }
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    publisher: 'StrokeWatch',
    kind: 'instance',
    software: { name: 'StrokeWatch FHIR sandbox', version },
    implementation: { description: 'StrokeWatch FHIR sandbox', url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'json'],
    patchFormat: ['application/json-patch+json'],
    rest: [rest],
  };
}

function resourceCapability(type) {
  const searchParam = Object.values(searchParametersOf(type))
    .filter((param) => SEARCHABLE[param.type])
    .map((param) => ({ name: param.code, definition: param.url, type: param.type }));
  return {
    type,
    profile: `http://hl7.org/fhir/StructureDefinition/${type}`,
    interaction: TYPE_INTERACTIONS.map((code) => ({ code })),
    versioning: 'versioned',
    readHistory: true,
    updateCreate: true,
    conditionalCreate: true,
    conditionalUpdate: true,
    conditionalDelete: 'single',
    searchParam,
  };
}

export function smartConfiguration(tokenUrl, authMethods = ['client_secret_basic', 'client_secret_post']) {
  const asymmetric = authMethods.includes('private_key_jwt');
  const symmetric = authMethods.some((method) => method.startsWith('client_secret'));
  return {
    token_endpoint: tokenUrl,
    grant_types_supported: ['client_credentials'],
    token_endpoint_auth_methods_supported: authMethods,
    ...(asymmetric ? { token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'] } : {}),
    scopes_supported: ['system/*.read', 'system/*.write', 'system/*.*', 'system/*.cruds', 'system/*.rs'],
    capabilities: [
      ...(symmetric ? ['client-confidential-symmetric'] : []),
      ...(asymmetric ? ['client-confidential-asymmetric'] : []),
    ],
  };
}
